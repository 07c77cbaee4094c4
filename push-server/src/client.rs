//! A minimal device client: enough to watch pushes arrive from the CLI and to drive the server
//! in tests. It has no reconnection, backoff or de-duplication; `mobile-sdk` is the real client.

use std::{collections::VecDeque, sync::Arc};

use bytes::BytesMut;
use push_proto::{
    device::{
        Ack, CallOutcome, CallOutcomeReply, CallOutcomeReport, ClientFrame, Goodbye, GoodbyeReason,
        HeartbeatReply, Hello, Push, ServerFrame, ServerHello, client_frame, server_frame,
    },
    frame,
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Why the client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket or TLS failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something undecodable.
    #[error("frame: {0}")]
    Frame(#[from] frame::FrameError),
    /// The server said goodbye.
    #[error("server goodbye {reason:?}: {detail}")]
    Goodbye {
        /// Reason.
        reason: GoodbyeReason,
        /// Detail.
        detail: String,
    },
    /// The server closed the connection.
    #[error("connection closed")]
    Closed,
    /// TLS configuration problem (bad CA file).
    #[error("tls: {0}")]
    Tls(String),
    /// The server sent a frame that makes no sense here.
    #[error("unexpected frame: {0}")]
    Unexpected(String),
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Server address.
    pub addr: std::net::SocketAddr,
    /// Name to verify in the server certificate.
    pub server_name: String,
    /// CA certificate (PEM) to trust.
    pub ca_pem: String,
    /// The hello to send.
    pub hello: Hello,
}

/// A connected, authenticated device session.
pub struct DeviceClient {
    tls: TlsStream<TcpStream>,
    rbuf: BytesMut,
    /// The server's hello.
    pub server_hello: ServerHello,
    /// Answer heartbeats automatically in `next_push`.
    pub auto_heartbeat: bool,
    /// Pushes that arrived while waiting for something else, handed out first.
    stash: VecDeque<Push>,
}

impl DeviceClient {
    /// Connect, handshake, say hello and wait for the server's answer.
    pub async fn connect(opts: ClientOptions) -> Result<Self, ClientError> {
        let mut tls = Self::open(&opts).await?;
        let mut out = BytesMut::new();
        frame::encode(
            &ClientFrame {
                kind: Some(client_frame::Kind::Hello(opts.hello)),
            },
            &mut out,
            frame::DEFAULT_MAX_FRAME,
        )?;
        tls.write_all(&out).await?;
        tls.flush().await?;
        let mut client = Self {
            tls,
            rbuf: BytesMut::new(),
            server_hello: ServerHello::default(),
            auto_heartbeat: true,
            stash: VecDeque::new(),
        };
        match client.next_frame().await?.and_then(|f| f.kind) {
            Some(server_frame::Kind::ServerHello(h)) => {
                client.server_hello = h;
                Ok(client)
            }
            Some(server_frame::Kind::Goodbye(g)) => Err(goodbye(g)),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(ClientError::Closed),
        }
    }

    /// Open the TLS connection only (tests use it to send raw bytes).
    pub async fn open(opts: &ClientOptions) -> Result<TlsStream<TcpStream>, ClientError> {
        let config = crate::pki::client_config(&opts.ca_pem).map_err(|e| ClientError::Tls(e.to_string()))?;
        let name =
            ServerName::try_from(opts.server_name.clone()).map_err(|e| ClientError::Tls(e.to_string()))?;
        let tcp = TcpStream::connect(opts.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(TlsConnector::from(Arc::new(config)).connect(name, tcp).await?)
    }

    /// Next frame, or `None` at end of stream.
    pub async fn next_frame(&mut self) -> Result<Option<ServerFrame>, ClientError> {
        loop {
            if let Some(f) = frame::decode::<ServerFrame>(&mut self.rbuf, frame::DEFAULT_MAX_FRAME)? {
                return Ok(Some(f));
            }
            self.rbuf.reserve(4096);
            if self.tls.read_buf(&mut self.rbuf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Next push, answering heartbeats on the way (if `auto_heartbeat`). A goodbye is an error.
    pub async fn next_push(&mut self) -> Result<Push, ClientError> {
        if let Some(p) = self.stash.pop_front() {
            return Ok(p);
        }
        loop {
            match self.next_frame().await?.and_then(|f| f.kind) {
                Some(server_frame::Kind::Push(p)) => return Ok(p),
                Some(server_frame::Kind::Heartbeat(h)) => {
                    if self.auto_heartbeat {
                        self.send(client_frame::Kind::HeartbeatReply(HeartbeatReply {
                            nonce: h.nonce,
                        }))
                        .await?;
                    }
                }
                Some(server_frame::Kind::Goodbye(g)) => return Err(goodbye(g)),
                Some(other) => return Err(ClientError::Unexpected(format!("{other:?}"))),
                None => return Err(ClientError::Closed),
            }
        }
    }

    /// Report what the user did with a call and wait for the server's reply (pushes arriving
    /// meanwhile are kept for `next_push`; heartbeats are answered).
    pub async fn report_call(
        &mut self,
        call_id: &str,
        outcome: CallOutcome,
    ) -> Result<CallOutcomeReply, ClientError> {
        self.send(client_frame::Kind::CallOutcome(CallOutcomeReport {
            call_id: call_id.into(),
            outcome: outcome as i32,
            at_ms: 0,
        }))
        .await?;
        loop {
            match self.next_frame().await?.and_then(|f| f.kind) {
                Some(server_frame::Kind::CallOutcomeReply(r)) if r.call_id == call_id => return Ok(r),
                Some(server_frame::Kind::Push(p)) => self.stash.push_back(p),
                Some(server_frame::Kind::Heartbeat(h)) => {
                    self.send(client_frame::Kind::HeartbeatReply(HeartbeatReply {
                        nonce: h.nonce,
                    }))
                    .await?
                }
                Some(server_frame::Kind::Goodbye(g)) => return Err(goodbye(g)),
                Some(other) => return Err(ClientError::Unexpected(format!("{other:?}"))),
                None => return Err(ClientError::Closed),
            }
        }
    }

    /// Acknowledge pushes.
    pub async fn ack(&mut self, seqs: &[u64]) -> Result<(), ClientError> {
        self.send(client_frame::Kind::Ack(Ack {
            up_to_seq: 0,
            seqs: seqs.to_vec(),
        }))
        .await
    }

    /// Acknowledge and end the stream at once, the ack and the FIN in one TCP segment, as an
    /// extension killed right after acking does (tests).
    pub async fn ack_then_close(mut self, seqs: &[u64]) -> Result<(), ClientError> {
        // Corked, the ack waits in the kernel until the shutdown's FIN carries it.
        socket2::SockRef::from(self.tls.get_ref().0).set_tcp_cork(true)?;
        self.ack(seqs).await?;
        self.tls.shutdown().await?;
        Ok(())
    }

    /// Say goodbye and close.
    pub async fn close(self) -> Result<(), ClientError> {
        self.stopped_by_ios("").await
    }

    /// Say goodbye as an iOS provider that `provider_stop_reason` stopped (Apple's
    /// `NEProviderStopReason` case name), and close.
    pub async fn stopped_by_ios(mut self, provider_stop_reason: &str) -> Result<(), ClientError> {
        let bye = Goodbye {
            reason: GoodbyeReason::ClientStopping as i32,
            provider_stop_reason: provider_stop_reason.into(),
            ..Default::default()
        };
        self.send(client_frame::Kind::Goodbye(bye)).await?;
        self.tls.shutdown().await?;
        Ok(())
    }

    /// Send one frame.
    pub async fn send(&mut self, kind: client_frame::Kind) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        frame::encode(
            &ClientFrame { kind: Some(kind) },
            &mut out,
            frame::DEFAULT_MAX_FRAME,
        )?;
        self.tls.write_all(&out).await?;
        self.tls.flush().await?;
        Ok(())
    }
}

fn goodbye(g: Goodbye) -> ClientError {
    ClientError::Goodbye {
        reason: GoodbyeReason::try_from(g.reason).unwrap_or(GoodbyeReason::Unspecified),
        detail: g.detail,
    }
}
