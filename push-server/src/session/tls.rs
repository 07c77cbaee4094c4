//! TLS 1.3 for device sessions on rustls' unbuffered API, so an idle session owns no buffer.
//!
//! rustls' buffered connection (what tokio-rustls wraps) keeps a 4 KiB receive buffer for the
//! connection's lifetime: a third of what an idle session cost. Here a read borrows a per-thread
//! scratch buffer for the time of the read; the session keeps only the bytes of a record not yet
//! complete (none while idle), and its TLS output (frames, alerts, a key update) only until it
//! is written.

use std::{cell::RefCell, io, sync::Arc};

use rustls::{
    ServerConfig,
    server::ServerConnectionData,
    server::UnbufferedServerConnection,
    unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic},
};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream};

/// Room for the largest record rustls accepts (16 KiB of data and its expansion) and a little
/// more, so one record never needs two reads for lack of space.
const READ_SIZE: usize = 18 * 1024;

/// The handshake's first read buffer: a client's flights fit (a ClientHello is ~300 bytes).
const HANDSHAKE_READ: usize = 2048;

thread_local! {
    /// Lent to one read at a time: a read never waits while it holds it.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A device's TLS 1.3 connection after its handshake.
pub struct DeviceTls {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received bytes rustls has not consumed: the start of a record (empty while idle).
    unprocessed: Vec<u8>,
    /// TLS records encoded but not yet written, in order (empty while idle).
    outgoing: Vec<u8>,
}

/// What the handshake does next.
enum Step {
    /// Ask rustls again.
    Continue,
    /// Write what rustls encoded.
    Transmit,
    /// Read more from the client.
    Read,
    /// Done, if the handshake is complete.
    Ready,
}

/// What rustls made of the bytes handed to it.
enum Progress {
    /// It needs more bytes.
    More,
    /// The peer sent close_notify.
    PeerClosed,
    /// The reader wants no more data.
    Declined,
}

impl DeviceTls {
    /// Run the server side of the handshake on `tcp`. Errors are `io::Error`s as tokio-rustls
    /// reports them: a TLS failure carries its [`rustls::Error`] (kind `InvalidData`), after the
    /// alert it calls for was sent.
    pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
        let mut tls = Self {
            tcp,
            conn,
            unprocessed: Vec::new(),
            outgoing: Vec::new(),
        };
        // The handshake's own buffer lives in the handshake task, which ends with it. Small: a
        // client's flights are a few hundred bytes, and while a whole site reconnects thousands of
        // handshakes run at once, the holes they leave in the heap counting towards every session.
        let mut incoming = vec![0; HANDSHAKE_READ];
        let mut used = 0;
        loop {
            let UnbufferedStatus { discard, state } = tls.conn.process_tls_records(&mut incoming[..used]);
            let step = match state {
                Err(e) => Err(e),
                Ok(ConnectionState::EncodeTlsData(mut record)) => {
                    encode(&mut tls.outgoing, |out| record.encode(out)).map_err(io::Error::other)?;
                    Ok(Step::Continue)
                }
                Ok(ConnectionState::TransmitTlsData(sent)) => {
                    // Written just below, before rustls is asked for anything else.
                    sent.done();
                    Ok(Step::Transmit)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Step::Read),
                // Nothing more to send. With TLS 1.3 the server may write before the client's
                // Finished arrived, so this is the end only once the handshake is complete; any
                // application data that came with the Finished is handed out again by the first
                // read.
                Ok(ConnectionState::WriteTraffic(_) | ConnectionState::ReadTraffic(_)) => Ok(Step::Ready),
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"));
                }
                Ok(other) => return Err(io::Error::other(format!("unexpected TLS state {other:?}"))),
            };
            incoming.copy_within(discard..used, 0);
            used -= discard;
            match step {
                Err(e) => {
                    tls.queue_alert(&mut incoming[..used]);
                    let _ = tls.send_outgoing().await;
                    return Err(invalid_data(e));
                }
                Ok(Step::Continue) => {}
                Ok(Step::Transmit) => tls.send_outgoing().await?,
                Ok(Step::Ready) if !tls.conn.is_handshaking() => break,
                Ok(Step::Read | Step::Ready) => {
                    if used == incoming.len() {
                        // A larger flight, or a handshake message spanning records (rustls
                        // bounds it at 64 KiB).
                        incoming.resize(used + READ_SIZE, 0);
                    }
                    match tls.tcp.read(&mut incoming[used..]).await? {
                        0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")),
                        n => used += n,
                    }
                }
            }
        }
        tls.unprocessed = incoming[..used].to_vec();
        Ok(tls)
    }

    /// Whether the handshake resumed a session from a ticket.
    pub fn handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// Wait until the socket has something to read (data, end of stream or an error).
    pub async fn readable(&self) -> io::Result<()> {
        self.tcp.readable().await
    }

    /// Read everything the socket holds without waiting, handing each record's application
    /// data to `deliver` until it returns false (the rest is then ignored). `Ok(false)` once the
    /// device closed the connection cleanly (close_notify); a TCP end of stream without one is
    /// an `UnexpectedEof` error, as rustls reports it.
    pub fn read_available(&mut self, mut deliver: impl FnMut(&[u8]) -> bool) -> io::Result<bool> {
        SCRATCH.with_borrow_mut(|buf| {
            let mut used = self.unprocessed.len();
            if buf.len() < used + READ_SIZE {
                buf.resize(used + READ_SIZE, 0);
            }
            buf[..used].copy_from_slice(&self.unprocessed);
            let result = self.read_into(buf, &mut used, &mut deliver);
            self.unprocessed = match result {
                Ok(true) => buf[..used].to_vec(),
                _ => Vec::new(),
            };
            result
        })
    }

    fn read_into(
        &mut self,
        buf: &mut Vec<u8>,
        used: &mut usize,
        deliver: &mut impl FnMut(&[u8]) -> bool,
    ) -> io::Result<bool> {
        // rustls first: it may hold data already (what came with the client's Finished).
        loop {
            match self.process(buf, used, deliver)? {
                Progress::More => {}
                Progress::PeerClosed => return Ok(false),
                Progress::Declined => return Ok(true),
            }
            if buf.len() - *used < READ_SIZE {
                // Only a handshake message spanning records grows it (rustls bounds those).
                buf.resize(*used + READ_SIZE, 0);
            }
            match self.tcp.try_read(&mut buf[*used..]) {
                Ok(0) => return Err(unexpected_eof()),
                Ok(n) => *used += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }

    /// Hand rustls `buf[..used]` until it needs more, dropping what it consumed.
    fn process(
        &mut self,
        buf: &mut [u8],
        used: &mut usize,
        deliver: &mut impl FnMut(&[u8]) -> bool,
    ) -> io::Result<Progress> {
        loop {
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(&mut buf[..*used]);
            let progress = match state {
                Err(e) => {
                    buf.copy_within(discard..*used, 0);
                    *used -= discard;
                    self.queue_alert(&mut buf[..*used]);
                    self.send_now();
                    return Err(invalid_data(e));
                }
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    let mut wanted = true;
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(invalid_data)?;
                        discard += record.discard;
                        wanted = wanted && deliver(record.payload);
                    }
                    (!wanted).then_some(Progress::Declined)
                }
                Ok(ConnectionState::EncodeTlsData(mut record)) => {
                    encode(&mut self.outgoing, |out| record.encode(out)).map_err(io::Error::other)?;
                    None
                }
                Ok(ConnectionState::TransmitTlsData(sent)) => {
                    // A key update's answer: it goes now if the socket takes it, else before the
                    // next write.
                    sent.done();
                    self.send_now();
                    None
                }
                Ok(ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake) => {
                    Some(Progress::More)
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Some(Progress::PeerClosed),
                Ok(other) => return Err(io::Error::other(format!("unexpected TLS state {other:?}"))),
            };
            buf.copy_within(discard..*used, 0);
            *used -= discard;
            if let Some(progress) = progress {
                return Ok(progress);
            }
        }
    }

    /// Encrypt `plaintext` and write it (after any alert or key update waiting), then free the
    /// buffer it took.
    pub async fn write_all(&mut self, plaintext: &[u8]) -> io::Result<()> {
        // A record adds 22 bytes (header, content type, AEAD tag) to at most 16 KiB of data.
        let size = plaintext.len() + 22 * (plaintext.len() / (16 * 1024) + 1);
        self.encrypt(size, |w, out| w.encrypt(plaintext, out))?;
        self.send_outgoing().await
    }

    /// Send close_notify (unless the connection failed) and close the sending side.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        let _ = self.encrypt(32, |w, out| w.queue_close_notify(out));
        self.send_outgoing().await?;
        self.tcp.shutdown().await
    }

    async fn send_outgoing(&mut self) -> io::Result<()> {
        if !self.outgoing.is_empty() {
            self.tcp.write_all(&self.outgoing).await?;
            self.outgoing = Vec::new();
        }
        Ok(())
    }

    /// Run `write` on rustls' writing state with about `size` bytes of room, appending the
    /// records it makes to `outgoing`.
    fn encrypt(
        &mut self,
        size: usize,
        mut write: impl FnMut(
            &mut WriteTraffic<'_, ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
    ) -> io::Result<()> {
        loop {
            // The unconsumed bytes go in again: rustls tracks its place in them.
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.unprocessed);
            let done = match state.map_err(invalid_data)? {
                ConnectionState::WriteTraffic(mut w) => {
                    let start = self.outgoing.len();
                    self.outgoing.resize(start + size, 0);
                    let written = match write(&mut w, &mut self.outgoing[start..]) {
                        Err(EncryptError::InsufficientSize(s)) => {
                            self.outgoing.resize(start + s.required_size, 0);
                            write(&mut w, &mut self.outgoing[start..])
                        }
                        r => r,
                    };
                    self.outgoing.truncate(start + *written.as_ref().unwrap_or(&0));
                    written.map_err(io::Error::other)?;
                    true
                }
                ConnectionState::EncodeTlsData(mut record) => {
                    encode(&mut self.outgoing, |out| record.encode(out)).map_err(io::Error::other)?;
                    false
                }
                // Written, in order, with what follows.
                ConnectionState::TransmitTlsData(sent) => {
                    sent.done();
                    false
                }
                // Edge-triggered, and a read reported it already; writing stays allowed.
                ConnectionState::PeerClosed => false,
                ConnectionState::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                other => return Err(io::Error::other(format!("cannot write in TLS state {other:?}"))),
            };
            self.unprocessed.drain(..discard);
            if done {
                return Ok(());
            }
        }
    }

    /// After a failure, encode the alert rustls queued for it (one record). Asked again, rustls
    /// would parse the offending record again.
    fn queue_alert(&mut self, buf: &mut [u8]) {
        if let Ok(ConnectionState::EncodeTlsData(mut record)) = self.conn.process_tls_records(buf).state {
            let _ = encode(&mut self.outgoing, |out| record.encode(out));
        }
    }

    /// Write what is waiting without blocking; what the socket does not take waits for the
    /// next write.
    fn send_now(&mut self) {
        while !self.outgoing.is_empty() {
            match self.tcp.try_write(&self.outgoing) {
                Ok(n) if n > 0 => {
                    self.outgoing.drain(..n);
                }
                _ => return,
            }
        }
        self.outgoing = Vec::new();
    }

    /// Heap bytes this connection holds outside rustls (tests: none while idle).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.unprocessed.capacity() + self.outgoing.capacity()
    }
}

/// Append one encoded record to `out`.
fn encode(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.resize(start + 512, 0);
    let written = match encode(&mut out[start..]) {
        Err(EncodeError::InsufficientSize(s)) => {
            out.resize(start + s.required_size, 0);
            encode(&mut out[start..])
        }
        r => r,
    };
    out.truncate(start + *written.as_ref().unwrap_or(&0));
    written.map(drop)
}

fn invalid_data(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn unexpected_eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "peer closed connection without sending TLS close_notify",
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rustls::ClientConnection;
    use tokio::net::TcpListener;

    use super::*;

    /// A server connection and a real rustls client on the other end of a loopback socket; the
    /// client's records are sealed and sent by hand, so a test decides where they are cut.
    struct Pair {
        server: DeviceTls,
        client: ClientConnection,
        client_tcp: TcpStream,
        _pki: tempfile::TempDir,
    }

    async fn connect() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let (pki, _) = crate::pki::load_or_create(dir.path(), &["localhost".to_string()]).unwrap();
        let server_cfg = Arc::new(crate::pki::server_config(&pki).unwrap());
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(crate::pki::client_config(&pki.ca_cert_pem).unwrap()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, client) = tokio::join!(
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                DeviceTls::accept(server_cfg, tcp).await.unwrap()
            },
            async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                connector
                    .connect("localhost".try_into().unwrap(), tcp)
                    .await
                    .unwrap()
            },
        );
        let (client_tcp, client) = client.into_inner();
        Pair {
            server,
            client,
            client_tcp,
            _pki: dir,
        }
    }

    /// Like [`connect`], but the client queues `data` before the handshake, so it goes out in
    /// the same write as the client's Finished.
    async fn connect_with_finished(data: &[u8]) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let (pki, _) = crate::pki::load_or_create(dir.path(), &["localhost".to_string()]).unwrap();
        let server_cfg = Arc::new(crate::pki::server_config(&pki).unwrap());
        let client_cfg = Arc::new(crate::pki::client_config(&pki.ca_cert_pem).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, (client, client_tcp)) = tokio::join!(
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                DeviceTls::accept(server_cfg, tcp).await.unwrap()
            },
            async {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                let mut client = ClientConnection::new(client_cfg, "localhost".try_into().unwrap()).unwrap();
                client.writer().write_all(data).unwrap();
                loop {
                    let mut out = Vec::new();
                    while client.wants_write() {
                        client.write_tls(&mut out).unwrap();
                    }
                    tcp.write_all(&out).await.unwrap();
                    if !client.is_handshaking() {
                        break (client, tcp);
                    }
                    let mut buf = vec![0; 16 * 1024];
                    let n = tcp.read(&mut buf).await.unwrap();
                    client.read_tls(&mut &buf[..n]).unwrap();
                    client.process_new_packets().unwrap();
                }
            },
        );
        Pair {
            server,
            client,
            client_tcp,
            _pki: dir,
        }
    }

    impl Pair {
        /// The client's records for `data`.
        fn seal(&mut self, data: &[u8]) -> Vec<u8> {
            self.client.writer().write_all(data).unwrap();
            self.sealed()
        }

        fn sealed(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut out).unwrap();
            }
            out
        }

        /// Wait for the socket and read until `done` holds of what was delivered.
        async fn read_until(
            &mut self,
            got: &mut Vec<u8>,
            done: impl Fn(&DeviceTls, &[u8]) -> bool,
        ) -> io::Result<bool> {
            loop {
                self.server.readable().await?;
                let open = self.server.read_available(|data| {
                    got.extend_from_slice(data);
                    true
                })?;
                if !open || done(&self.server, got) {
                    return Ok(open);
                }
            }
        }

        /// What the client decrypts next: data, or empty after close_notify.
        async fn receive(&mut self) -> Result<Vec<u8>, rustls::Error> {
            loop {
                let mut buf = [0; 4096];
                let n = self.client_tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "the server closed TCP without close_notify");
                self.client.read_tls(&mut &buf[..n]).unwrap();
                let state = self.client.process_new_packets()?;
                if state.plaintext_bytes_to_read() > 0 {
                    let mut data = vec![0; state.plaintext_bytes_to_read()];
                    self.client.reader().read_exact(&mut data).unwrap();
                    return Ok(data);
                }
                if state.peer_has_closed() {
                    return Ok(Vec::new());
                }
            }
        }
    }

    #[tokio::test]
    async fn a_record_split_across_reads_is_kept_until_complete_and_nothing_is_held_after() {
        let mut p = connect().await;
        assert_eq!(p.server.buffered(), 0, "nothing held after the handshake");
        let record = p.seal(b"hello, server");
        let (first, second) = record.split_at(record.len() / 2);
        p.client_tcp.write_all(first).await.unwrap();
        let mut got = Vec::new();
        let first_len = first.len();
        assert!(
            p.read_until(&mut got, |s, _| s.unprocessed.len() == first_len)
                .await
                .unwrap()
        );
        assert!(got.is_empty(), "half a record decrypts to nothing");
        assert_eq!(p.server.unprocessed, first, "the half record is kept");

        p.client_tcp.write_all(second).await.unwrap();
        assert!(p.read_until(&mut got, |_, got| !got.is_empty()).await.unwrap());
        assert_eq!(got, b"hello, server");
        assert_eq!(p.server.buffered(), 0, "an idle session holds no buffer");
    }

    /// Regression: data that came with the client's Finished sat in rustls, unread, while the
    /// session waited for the socket to turn readable again.
    #[tokio::test]
    async fn data_sent_with_the_clients_finished_is_read_without_waiting_for_the_socket() {
        let mut p = connect_with_finished(b"hello with the finished").await;
        let mut got = Vec::new();
        // As the driver does: one read before the first wait.
        assert!(
            p.server
                .read_available(|data| {
                    got.extend_from_slice(data);
                    true
                })
                .unwrap()
        );
        assert_eq!(got, b"hello with the finished");
        assert_eq!(p.server.buffered(), 0);
    }

    #[tokio::test]
    async fn records_after_the_one_the_reader_declines_are_not_delivered() {
        let mut p = connect().await;
        let mut records = p.seal(b"first");
        records.extend(p.seal(b"second"));
        p.client_tcp.write_all(&records).await.unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            p.server.readable().await.unwrap();
            p.server
                .read_available(|data| {
                    got.push(data.to_vec());
                    false
                })
                .unwrap();
        }
        assert_eq!(got, [b"first".to_vec()]);
    }

    #[tokio::test]
    async fn writes_reach_the_client_and_shutdown_sends_close_notify() {
        let mut p = connect().await;
        p.server.write_all(b"pong").await.unwrap();
        assert_eq!(p.server.buffered(), 0, "the write buffer is freed once written");
        // The two session tickets came first, then the data.
        assert_eq!(p.receive().await.unwrap(), b"pong");
        p.server.shutdown().await.unwrap();
        assert_eq!(p.receive().await.unwrap(), b"", "close_notify");
    }

    #[tokio::test]
    async fn close_notify_is_a_clean_end_and_a_bare_tcp_close_is_not() {
        let mut p = connect().await;
        let mut closing = p.seal(b"bye");
        p.client.send_close_notify();
        closing.extend(p.sealed());
        p.client_tcp.write_all(&closing).await.unwrap();
        let mut got = Vec::new();
        assert!(!p.read_until(&mut got, |_, _| false).await.unwrap(), "clean end");
        assert_eq!(got, b"bye", "data before close_notify is delivered");

        let mut p = connect().await;
        let record = p.seal(b"cut");
        p.client_tcp.write_all(&record).await.unwrap();
        p.client_tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        let e = p.read_until(&mut got, |_, _| false).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"cut", "data before the end is delivered");
    }

    #[tokio::test]
    async fn a_forged_record_fails_the_read_and_the_device_gets_the_alert() {
        let mut p = connect().await;
        let mut record = p.seal(b"tampered");
        *record.last_mut().unwrap() ^= 1;
        p.client_tcp.write_all(&record).await.unwrap();
        let e = p.read_until(&mut Vec::new(), |_, _| false).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let tls_error = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        assert_eq!(tls_error, Some(&rustls::Error::DecryptError));
        assert_eq!(
            p.receive().await,
            Err(rustls::Error::AlertReceived(
                rustls::AlertDescription::BadRecordMac
            ))
        );
    }

    #[tokio::test]
    async fn a_key_update_from_the_device_is_answered_and_both_directions_go_on() {
        let mut p = connect().await;
        p.client.refresh_traffic_keys().unwrap();
        let record = p.seal(b"new keys");
        p.client_tcp.write_all(&record).await.unwrap();
        let mut got = Vec::new();
        p.read_until(&mut got, |_, got| !got.is_empty()).await.unwrap();
        assert_eq!(got, b"new keys");
        p.server.write_all(b"still here").await.unwrap();
        assert_eq!(p.receive().await.unwrap(), b"still here");
        let record = p.seal(b"and again");
        p.client_tcp.write_all(&record).await.unwrap();
        let mut got = Vec::new();
        p.read_until(&mut got, |_, got| !got.is_empty()).await.unwrap();
        assert_eq!(got, b"and again");
    }
}
