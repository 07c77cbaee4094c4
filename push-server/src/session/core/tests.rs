use super::*;
use push_proto::device::{HeartbeatReply, Push, push};

/// Frames in and out, for tests that speak in frames (here and `hub::sim`).
impl Session {
    pub(crate) fn handle_frame(&mut self, now: Instant, frame: ClientFrame) {
        let mut bytes = BytesMut::new();
        frame::encode(&frame, &mut bytes, frame::DEFAULT_MAX_FRAME).unwrap();
        self.handle_bytes(now, &bytes);
    }

    /// What `poll_transmit` yields, decoded.
    pub(crate) fn poll_frames(&mut self) -> Vec<server_frame::Kind> {
        let mut buf = BytesMut::from(&self.poll_transmit().unwrap_or_default()[..]);
        std::iter::from_fn(|| frame::decode::<ServerFrame>(&mut buf, usize::MAX).unwrap())
            .filter_map(|f| f.kind)
            .collect()
    }
}

const T: Timing = Timing {
    hello_timeout: Duration::from_secs(5),
    heartbeat_interval: Duration::from_secs(30),
    heartbeat_timeout: Duration::from_secs(10),
};

fn frame(kind: client_frame::Kind) -> ClientFrame {
    ClientFrame { kind: Some(kind) }
}

#[test]
fn a_floor_at_or_above_2_pow_52_is_a_protocol_error() {
    let now = Instant::now();
    for floor in [MAX_FLOOR, 1 << 53, u64::MAX] {
        let mut s = Session::new(now, T, frame::DEFAULT_MAX_FRAME);
        s.handle_frame(
            now,
            frame(client_frame::Kind::Hello(Hello {
                last_seen_seq: floor,
                ..Default::default()
            })),
        );
        assert!(
            matches!(s.poll_frames().first(), Some(server_frame::Kind::Goodbye(g)) if g.reason == GoodbyeReason::ProtocolError as i32),
            "floor {floor}"
        );
        assert!(!matches!(s.poll_event(), Some(Event::Hello(_))));
    }
}

fn established(now: Instant) -> Session {
    let mut s = Session::new(now, T, frame::DEFAULT_MAX_FRAME);
    s.handle_frame(
        now,
        frame(client_frame::Kind::Hello(Hello {
            last_seen_seq: 4,
            ..Default::default()
        })),
    );
    assert!(matches!(s.poll_event(), Some(Event::Hello(h)) if h.last_seen_seq == 4));
    s.accept(now, Welcome::default(), 4);
    assert!(matches!(
        s.poll_frames()[..],
        [server_frame::Kind::ServerHello(_)]
    ));
    s
}

fn push_frame(seq: u64) -> EncodedPush {
    EncodedPush::of(&Push {
        seq,
        id: format!("m{seq}"),
        body: Some(push::Body::Message(Default::default())),
    })
}

fn goodbye_reason(s: &mut Session) -> Option<GoodbyeReason> {
    s.poll_frames().into_iter().find_map(|f| match f {
        server_frame::Kind::Goodbye(g) => GoodbyeReason::try_from(g.reason).ok(),
        _ => None,
    })
}

#[test]
fn a_goodbye_keeps_why_ios_stopped_the_provider() {
    let t0 = Instant::now();
    for (sent, kept) in [
        (
            "unrecoverableNetworkChange",
            "device goodbye: GOODBYE_REASON_CLIENT_STOPPING (iOS: unrecoverableNetworkChange)",
        ),
        (
            "notAnAppleReason",
            "device goodbye: GOODBYE_REASON_CLIENT_STOPPING (iOS: unknown)",
        ),
        ("", "device goodbye: GOODBYE_REASON_CLIENT_STOPPING"),
    ] {
        let mut s = established(t0);
        s.handle_frame(
            t0,
            frame(client_frame::Kind::Goodbye(Goodbye {
                reason: GoodbyeReason::ClientStopping as i32,
                provider_stop_reason: sent.into(),
                ..Default::default()
            })),
        );
        let closed = std::iter::from_fn(|| s.poll_event()).find_map(|e| match e {
            Event::Closed(reason) => Some(reason.to_string()),
            _ => None,
        });
        assert_eq!(closed.as_deref(), Some(kept), "{sent}");
    }
}

#[test]
fn hello_timeout_closes_with_goodbye() {
    let t0 = Instant::now();
    let mut s = Session::new(t0, T, frame::DEFAULT_MAX_FRAME);
    assert_eq!(s.poll_timeout(), Some(t0 + T.hello_timeout));
    s.handle_timeout(t0 + T.hello_timeout - Duration::from_millis(1));
    assert!(!s.is_closed());
    s.handle_timeout(t0 + T.hello_timeout);
    assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::ProtocolError));
    assert_eq!(s.poll_event(), Some(Event::Closed(CloseReason::HelloTimeout)));
}

#[test]
fn first_frame_must_be_hello() {
    let t0 = Instant::now();
    let mut s = Session::new(t0, T, frame::DEFAULT_MAX_FRAME);
    s.handle_frame(t0, frame(client_frame::Kind::Ack(Ack::default())));
    assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::ProtocolError));
    assert!(matches!(
        s.poll_event(),
        Some(Event::Closed(CloseReason::ProtocolError(_)))
    ));
    assert!(s.poll_timeout().is_none(), "a closed session wants no timer");
}

#[test]
fn a_frame_over_the_default_limit_is_refused_until_the_hello_is_accepted() {
    let t0 = Instant::now();
    let header = (frame::DEFAULT_MAX_FRAME as u32 + 1).to_be_bytes();
    let mut s = Session::new(t0, T, 2 * frame::DEFAULT_MAX_FRAME);
    s.handle_bytes(t0, &header);
    assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::ProtocolError));
    let mut s = Session::new(t0, T, 2 * frame::DEFAULT_MAX_FRAME);
    s.handle_frame(t0, frame(client_frame::Kind::Hello(Hello::default())));
    s.accept(t0, Welcome::default(), 0);
    s.handle_bytes(t0, &header);
    assert!(
        !s.is_closed(),
        "within the configured limit: the rest of the frame is awaited"
    );
}

#[test]
fn empty_frame_is_protocol_error() {
    let t0 = Instant::now();
    let mut s = established(t0);
    s.handle_frame(t0, ClientFrame { kind: None });
    assert!(s.is_closed());
}

#[test]
fn heartbeat_cycle_and_deadline() {
    let t0 = Instant::now();
    let mut s = established(t0);
    let due = t0 + T.heartbeat_interval;
    assert_eq!(s.poll_timeout(), Some(due));
    s.handle_timeout(due);
    let [server_frame::Kind::Heartbeat(hb)] = &s.poll_frames()[..] else {
        panic!()
    };
    assert_eq!(s.poll_timeout(), Some(due + T.heartbeat_timeout));
    // Answered in time: the deadline goes away and the next heartbeat is scheduled.
    s.handle_frame(
        due + Duration::from_secs(1),
        frame(client_frame::Kind::HeartbeatReply(HeartbeatReply {
            nonce: hb.nonce,
        })),
    );
    assert_eq!(s.poll_timeout(), Some(due + T.heartbeat_interval));
    // Not answered: closed exactly at the deadline.
    let due2 = due + T.heartbeat_interval;
    s.handle_timeout(due2);
    assert!(s.poll_transmit().is_some());
    s.handle_timeout(due2 + T.heartbeat_timeout - Duration::from_millis(1));
    assert!(!s.is_closed());
    s.handle_timeout(due2 + T.heartbeat_timeout);
    assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::HeartbeatTimeout));
    assert_eq!(s.poll_event(), Some(Event::Closed(CloseReason::HeartbeatTimeout)));
}

#[test]
fn stale_heartbeat_reply_does_not_clear_deadline() {
    let t0 = Instant::now();
    let mut s = established(t0);
    s.handle_timeout(t0 + T.heartbeat_interval);
    let _ = s.poll_transmit();
    s.handle_frame(
        t0,
        frame(client_frame::Kind::HeartbeatReply(HeartbeatReply { nonce: 0 })),
    );
    s.handle_timeout(t0 + T.heartbeat_interval + T.heartbeat_timeout);
    assert!(s.is_closed());
}

#[test]
fn pushes_are_written_once_in_order_and_acks_free_the_window() {
    let t0 = Instant::now();
    let mut s = established(t0);
    assert!(!s.push(push_frame(4)), "at or below last_seen is never written");
    assert!(s.push(push_frame(5)));
    assert!(s.push(push_frame(7)));
    assert!(!s.push(push_frame(6)), "out of order would break resume");
    assert!(!s.push(push_frame(7)), "a duplicate is never written");
    assert_eq!(s.inflight(), 2);
    assert_eq!(s.poll_frames().len(), 2);
    s.handle_frame(
        t0,
        frame(client_frame::Kind::Ack(Ack {
            up_to_seq: 5,
            seqs: vec![7],
        })),
    );
    assert_eq!(s.inflight(), 0);
    assert!(matches!(s.poll_event(), Some(Event::Acked(a)) if a.up_to_seq == 5));
}

#[test]
fn no_push_before_accept_and_second_hello_is_error() {
    let t0 = Instant::now();
    let mut s = Session::new(t0, T, frame::DEFAULT_MAX_FRAME);
    assert!(!s.push(push_frame(1)));
    let mut s = established(t0);
    s.handle_frame(t0, frame(client_frame::Kind::Hello(Hello::default())));
    assert!(s.is_closed());
}

#[test]
fn voip_token_is_an_event_only_after_hello() {
    let t0 = Instant::now();
    let token = |t: &str| {
        frame(client_frame::Kind::VoipToken(push_proto::device::VoipToken {
            token: t.into(),
        }))
    };
    let mut s = established(t0);
    s.handle_frame(t0, token("abcd"));
    assert_eq!(s.poll_event(), Some(Event::VoipToken("abcd".into())));
    let mut s = Session::new(t0, T, frame::DEFAULT_MAX_FRAME);
    s.handle_frame(t0, token("abcd"));
    assert!(s.is_closed(), "hello must come first");
}

#[test]
fn oversized_hello_or_network_change_fields_end_the_session_before_any_event() {
    let now = Instant::now();
    let mut s = Session::new(now, T, frame::DEFAULT_MAX_FRAME);
    s.handle_frame(
        now,
        frame(client_frame::Kind::Hello(Hello {
            credential: "c".into(),
            ssid: "s".repeat(3000),
            ..Hello::default()
        })),
    );
    assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::ProtocolError));
    assert!(
        matches!(s.poll_event(), Some(Event::Closed(CloseReason::ProtocolError(d))) if d.contains("ssid"))
    );
    let mut s = established(now);
    s.handle_frame(
        now,
        frame(client_frame::Kind::NetworkChange(
            push_proto::device::NetworkChange {
                ssid: "s".repeat(33),
                path_lost: false,
            },
        )),
    );
    assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::ProtocolError));
    assert!(s.is_closed());
    while let Some(e) = s.poll_event() {
        assert!(!matches!(e, Event::NetworkChanged(_)), "{e:?}");
    }
}

#[test]
fn goodbye_is_sent_once() {
    let t0 = Instant::now();
    let mut s = established(t0);
    s.goodbye(GoodbyeReason::Replaced, "newer session");
    s.goodbye(GoodbyeReason::ServerShutdown, "again");
    assert_eq!(s.poll_frames().len(), 1);
    assert_eq!(
        s.poll_event(),
        Some(Event::Closed(CloseReason::ServerGoodbye(GoodbyeReason::Replaced)))
    );
    assert_eq!(s.poll_event(), None);
}

/// Nothing is queued after the close (a property of the `session_core` fuzz target): a hello
/// and a second frame in one read close the session (protocol error, goodbye sent) before the
/// driver authenticates the hello, and a refused credential then queued a second goodbye.
#[test]
fn reject_after_close_sends_nothing() {
    let t0 = Instant::now();
    let mut s = Session::new(t0, T, frame::DEFAULT_MAX_FRAME);
    s.handle_frame(t0, frame(client_frame::Kind::Hello(Hello::default())));
    s.handle_frame(t0, frame(client_frame::Kind::Ack(Ack::default())));
    assert!(s.is_closed());
    s.reject(GoodbyeReason::AuthFailed, "credential refused");
    assert_eq!(s.poll_frames().len(), 1);
    assert!(matches!(s.poll_event(), Some(Event::Hello(_))));
    assert!(matches!(
        s.poll_event(),
        Some(Event::Closed(CloseReason::ProtocolError(_)))
    ));
    assert_eq!(s.poll_event(), None);
}

/// Architecture invariant, as the SDK core's: the core does no I/O and reads no clock.
#[test]
fn core_sources_name_no_io_and_no_clock() {
    let session = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/session");
    let core = [session.join("core.rs"), session.join("fields.rs")];
    assert_eq!(testkit::sans_io::assert_sans_io(&core), 2);
}
