//! Scenario tests: one behaviour each, driven step by step on the fake clock.

use std::time::Duration;

use push_proto::device::{GoodbyeReason, client_frame, server_frame};

use super::*;
use crate::core::{Backoff, Disconnect, HostStop, NetworkEvent, StopCause, StopReason};

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn start_connects_at_once_and_the_hello_carries_what_the_server_needs() {
    let mut h = Harness::new(config(41));
    assert_eq!(h.s.poll_timeout(), None, "an idle session wants no timer");
    h.start();
    assert_eq!(h.commands, [TransportCommand::Connect]);
    assert_eq!(h.s.state(), &State::Connecting { attempt: 1 });
    assert!(h.sent.is_empty(), "nothing is written before the transport is up");
    h.connected();
    let hello = h.hellos()[0].clone();
    assert_eq!(hello.credential, "cred");
    assert_eq!(hello.last_seen_seq, 41);
    assert_eq!(hello.ssid, "ward-4b");
    assert_eq!(hello.instance_id, "inst-1");
    assert!(hello.sdk_version.starts_with("mobile-sdk/"));
    assert_eq!(
        hello.device_time_ms, PHONE_TIME_MS,
        "the phone's clock, for the server's skew check"
    );
    h.server_hello();
    assert_eq!(
        h.s.state(),
        &State::Connected {
            session_id: "s1".into(),
            device_id: "dev-1".into()
        }
    );
    // A second start while running changes nothing.
    h.start();
    assert_eq!(h.connects(), 1);
}

#[test]
fn heartbeats_are_answered_with_their_nonce() {
    let mut h = Harness::new(config(0));
    h.establish();
    h.heartbeat(7);
    h.heartbeat(8);
    let replies: Vec<u64> = h
        .sent
        .iter()
        .filter_map(|f| match &f.kind {
            Some(client_frame::Kind::HeartbeatReply(r)) => Some(r.nonce),
            _ => None,
        })
        .collect();
    assert_eq!(replies, [7, 8]);
}

#[test]
fn pushes_are_acked_only_after_the_app_took_them() {
    let mut h = Harness::new(config(0));
    h.auto_take = false;
    h.establish();
    h.push_message(1, "m1");
    h.push_message(2, "m2");
    assert_eq!(h.shown(), [1, 2]);
    assert!(h.acked().is_empty(), "nothing acked before the app took it");
    assert_eq!(h.s.last_seen().seq, 0);
    assert!(h.take(2));
    assert_eq!(h.acked(), [2]);
    assert_eq!(h.s.last_seen().seq, 0, "1 is still with the app");
    assert!(h.take(1));
    assert_eq!(h.acked(), [2, 1]);
    assert_eq!(h.s.last_seen().seq, 2);
    assert_eq!(
        h.events.last(),
        Some(&Event::LastSeenSeq(LastSeen { epoch: EPOCH, seq: 2 }))
    );
    assert!(!h.take(1), "a push is taken once");
    assert!(!h.take(99), "unknown sequences are refused");
}

#[test]
fn duplicates_by_sequence_and_by_id_are_dropped_and_acked() {
    let mut h = Harness::new(config(10));
    h.establish();
    h.push_message(9, "old");
    h.push_message(11, "m11");
    h.push_message(11, "m11-again");
    h.push_message(12, "m11");
    h.push_message(13, "m13");
    assert_eq!(h.shown(), [11, 13]);
    assert_eq!(h.s.dropped_pushes(), 3);
    assert_eq!(h.acked(), [9, 11, 11, 12, 13]);
    assert_eq!(h.s.last_seen().seq, 13);
}

/// Found by the property test: a push dropped as a duplicate by id settles its sequence, so a
/// later push with a lower sequence is a replay, not new.
#[test]
fn a_duplicate_by_id_raises_the_floor_too() {
    let mut h = Harness::new(config(0));
    h.establish();
    h.push_message(1, "a");
    h.push_message(6, "a");
    assert_eq!(h.s.last_seen().seq, 6);
    h.push_message(2, "b");
    assert_eq!(h.shown(), [1]);
}

#[test]
fn reconnect_resumes_from_last_seen_without_loss_or_duplicates() {
    let mut h = Harness::new(config(0));
    h.auto_take = false;
    h.establish();
    for seq in 1..=4 {
        h.push_message(seq, &format!("m{seq}"));
    }
    for seq in 1..=3 {
        assert!(h.take(seq));
    }
    // 4 is still with the app when the connection drops.
    h.disconnected("reset by peer");
    assert!(matches!(
        h.s.state(),
        State::WaitingToRetry {
            reason: Disconnect::TransportClosed(_),
            ..
        }
    ));
    h.sleep();
    assert_eq!(h.connects(), 2);
    h.reconnect();
    assert_eq!(h.hellos()[1].last_seen_seq, 3);
    let acks_before = h.acked().len();
    // The server replays 4 (unacknowledged) and sends 5.
    h.push_message(4, "m4");
    h.push_message(5, "m5");
    assert_eq!(h.shown(), [1, 2, 3, 4, 5], "4 shown once");
    assert_eq!(
        h.acked().len(),
        acks_before,
        "the replayed 4 is not acked for the app"
    );
    assert!(h.take(4));
    assert!(h.take(5));
    assert_eq!(h.acked()[acks_before..], [4, 5]);
    assert_eq!(h.s.last_seen().seq, 5);
}

#[test]
fn a_new_instance_resumes_from_the_persisted_sequence() {
    let mut first = Harness::new(config(0));
    first.establish();
    first.push_message(1, "m1");
    first.push_message(2, "m2");
    let persisted = first
        .events
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::LastSeenSeq(s) => Some(*s),
            _ => None,
        })
        .unwrap();
    assert_eq!(persisted, LastSeen { epoch: EPOCH, seq: 2 });
    let mut second = Harness::new(resume(persisted));
    second.establish();
    assert_eq!(second.hellos()[0].last_seen_seq, 2);
    second.push_message(2, "m2");
    second.push_message(3, "m3");
    assert_eq!(second.shown(), [3]);
}

#[test]
fn dead_server_deadline_is_heartbeat_interval_plus_timeout_of_silence() {
    let mut h = Harness::new(config(0));
    h.establish();
    let silence = Duration::from_millis(u64::from(HB_INTERVAL_MS + HB_TIMEOUT_MS));
    assert_eq!(h.s.poll_timeout(), Some(h.now + silence));
    // Any bytes from the server push the deadline out.
    h.advance(silence - SECOND);
    h.heartbeat(1);
    let deadline = h.now + silence;
    assert_eq!(h.s.poll_timeout(), Some(deadline));
    h.sleep();
    assert_eq!(h.now, deadline);
    assert_eq!(h.closes(), 1);
    assert!(matches!(
        h.s.state(),
        State::WaitingToRetry {
            reason: Disconnect::ServerSilent,
            ..
        }
    ));
}

#[test]
fn a_clock_jump_counts_an_open_connection_as_heard_from_and_lets_other_deadlines_fall_due() {
    let mut h = Harness::new(config(0));
    h.establish();
    let silence = Duration::from_millis(u64::from(HB_INTERVAL_MS + HB_TIMEOUT_MS));
    // Half an hour passes at once while the connection stays open: still connected, silent
    // for a full silence from the jump on.
    h.advance(Duration::from_secs(1800));
    h.s.handle_clock_jump(h.now);
    h.drain();
    assert_eq!(h.s.poll_timeout(), Some(h.now + silence));
    assert!(matches!(h.s.state(), State::Connected { .. }));
    assert_eq!(h.closes(), 0);
    // Without the jump input the same span is silence: the session gives up on the server.
    h.advance(Duration::from_secs(1800));
    h.s.handle_timeout(h.now);
    h.drain();
    assert!(matches!(
        h.s.state(),
        State::WaitingToRetry {
            reason: Disconnect::ServerSilent,
            ..
        }
    ));
    // Waiting to retry, a jump changes nothing: the retry falls due by the new time.
    let retry_at = h.s.poll_timeout().expect("a retry is scheduled");
    h.advance(Duration::from_secs(600));
    h.s.handle_clock_jump(h.now);
    assert_eq!(h.s.poll_timeout(), Some(retry_at));
    h.s.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.connects(), 2, "the retry went out at the new time");
}

#[test]
fn call_past_its_ring_deadline_is_never_shown_judged_on_the_server_clock() {
    let mut h = Harness::new(config(0));
    h.establish();
    // 20 s after the ServerHello the server's clock reads SERVER_TIME_MS + 20 s, whatever the
    // device's own clock says.
    h.advance(20 * SECOND);
    let now_on_server = SERVER_TIME_MS + 20_000;
    h.server(server_frame::Kind::Push(call_invite(
        1,
        "late",
        now_on_server - 1,
    )));
    h.server(server_frame::Kind::Push(call_invite(
        2,
        "live",
        now_on_server + 15_000,
    )));
    h.server(server_frame::Kind::Push(call_cancel(3, "live")));
    assert_eq!(h.shown(), [2, 3]);
    let Some(Event::CallInvite(invite)) = h.events.iter().find(|e| matches!(e, Event::CallInvite(_))) else {
        panic!("no invite")
    };
    assert_eq!(invite.call_id, "live");
    assert_eq!(invite.ring_remaining, Duration::from_secs(15));
    assert_eq!(invite.call_uuid, push_proto::call_uuid("live"));
    assert!(
        h.acked().contains(&1),
        "the stale invite is acked so it is not replayed"
    );
}

#[test]
fn expired_messages_are_dropped() {
    let mut h = Harness::new(config(0));
    h.establish();
    let mut m = message(1, "m1");
    if let Some(push::Body::Message(body)) = &mut m.body {
        body.expires_at_ms = SERVER_TIME_MS - 1;
    }
    h.server(server_frame::Kind::Push(m));
    assert!(h.shown().is_empty());
    assert_eq!(h.acked(), [1]);
}

#[test]
fn replaced_revoked_and_refused_stop_for_good() {
    for (reason, cause) in [
        (GoodbyeReason::Replaced, StopCause::Replaced),
        (GoodbyeReason::CredentialRevoked, StopCause::CredentialRevoked),
        (GoodbyeReason::AuthFailed, StopCause::AuthFailed),
    ] {
        let mut h = Harness::new(config(0));
        h.establish();
        h.goodbye(reason);
        assert_eq!(h.s.state(), &State::Stopped(cause.clone()), "{reason:?}");
        assert_eq!(h.closes(), 1);
        assert_eq!(h.s.poll_timeout(), None, "{reason:?}: no timer, no retry");
        h.s.handle_network(h.now, NetworkEvent::Joined { ssid: "other".into() });
        h.s.handle_system_timer(h.now + Duration::from_secs(3600));
        h.drain();
        assert_eq!(h.connects(), 1, "{reason:?}: never reconnects on its own");
        // Refused at the hello (before ServerHello) is just as final.
        let mut h = Harness::new(config(0));
        h.start();
        h.connected();
        h.goodbye(reason);
        assert_eq!(h.s.state(), &State::Stopped(cause), "{reason:?} at hello");
    }
}

#[test]
fn other_goodbyes_reconnect_with_backoff() {
    for reason in [
        GoodbyeReason::ServerShutdown,
        GoodbyeReason::Overloaded,
        GoodbyeReason::HeartbeatTimeout,
        GoodbyeReason::ProtocolError,
        GoodbyeReason::Unspecified,
    ] {
        let mut h = Harness::new(config(0));
        h.establish();
        h.goodbye(reason);
        let State::WaitingToRetry {
            retry_in,
            reason: why,
        } = h.s.state().clone()
        else {
            panic!("{reason:?}: {:?}", h.s.state())
        };
        assert_eq!(why, Disconnect::ServerGoodbye(reason));
        assert!(
            retry_in <= BACKOFF.base,
            "{reason:?}: first retry within the base window"
        );
        assert_eq!(h.s.poll_timeout(), Some(h.now + retry_in));
        h.sleep();
        assert_eq!(h.connects(), 2, "{reason:?}");
    }
}

#[test]
fn connect_timeout_covers_tcp_tls_and_hello() {
    let mut h = Harness::new(config(0));
    h.start();
    assert_eq!(h.s.poll_timeout(), Some(h.now + TIMING.connect_timeout));
    h.advance(4 * SECOND);
    h.connected();
    // The deadline does not restart when TCP+TLS are up: the server must answer in time.
    assert_eq!(h.s.poll_timeout(), Some(h.t0 + TIMING.connect_timeout));
    h.sleep();
    assert_eq!(h.closes(), 1);
    assert!(matches!(
        h.s.state(),
        State::WaitingToRetry {
            reason: Disconnect::ConnectTimeout,
            ..
        }
    ));
}

#[test]
fn backoff_windows_grow_while_attempts_fail_and_attempts_are_counted() {
    let mut h = Harness::new(config(0));
    h.start();
    let mut expected = Backoff::new(BACKOFF, config(0).jitter_seed);
    for attempt in 1..=12u32 {
        assert_eq!(h.s.state(), &State::Connecting { attempt });
        h.disconnected("connection refused");
        let State::WaitingToRetry { retry_in, .. } = h.s.state().clone() else {
            panic!("{:?}", h.s.state())
        };
        assert_eq!(retry_in, expected.next_delay(), "attempt {attempt}");
        assert!(retry_in <= BACKOFF.cap);
        h.sleep();
    }
}

#[test]
fn backoff_resets_only_after_a_stable_session() {
    let mut h = Harness::new(config(0));
    h.start();
    for _ in 0..6 {
        h.disconnected("refused");
        h.sleep();
    }
    h.reconnect();
    // Kicked out at once (an overloaded server): the backoff keeps growing.
    h.goodbye(GoodbyeReason::Overloaded);
    let mut model = Backoff::new(BACKOFF, config(0).jitter_seed);
    for _ in 0..6 {
        model.next_delay();
    }
    let State::WaitingToRetry { retry_in, .. } = h.s.state().clone() else {
        panic!()
    };
    assert_eq!(retry_in, model.next_delay(), "seventh delay, not a reset one");
    // A session that lasted past `stable_after` starts over from the base window.
    h.sleep();
    h.reconnect();
    h.advance(TIMING.stable_after);
    h.goodbye(GoodbyeReason::ServerShutdown);
    let State::WaitingToRetry { retry_in, .. } = h.s.state().clone() else {
        panic!()
    };
    assert!(retry_in <= BACKOFF.base, "{retry_in:?}");
}

#[test]
fn short_viability_flap_keeps_the_session() {
    let mut h = Harness::new(config(0));
    h.establish();
    h.s.handle_network(h.now, NetworkEvent::NotViable);
    assert_eq!(h.s.poll_timeout(), Some(h.now + TIMING.viability_debounce));
    h.advance(TIMING.viability_debounce - SECOND);
    h.s.handle_network(h.now, NetworkEvent::Viable);
    h.drain();
    h.advance(2 * SECOND);
    h.s.handle_timeout(h.now);
    h.drain();
    assert!(matches!(h.s.state(), State::Connected { .. }));
    assert_eq!(h.closes(), 0);
    assert_eq!(h.connects(), 1);
}

/// The `NetworkChange` frames the session sent, as (ssid, path_lost).
fn path_reports(h: &Harness) -> Vec<(String, bool)> {
    h.sent
        .iter()
        .filter_map(|f| match &f.kind {
            Some(client_frame::Kind::NetworkChange(c)) => Some((c.ssid.clone(), c.path_lost)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_failing_path_is_told_to_the_server_while_the_connection_may_still_carry_it() {
    let mut h = Harness::new(config(0));
    h.establish();
    // A flap: lost, then back within the debounce; the session stays and says both.
    h.s.handle_network(h.now, NetworkEvent::NotViable);
    h.drain();
    h.s.handle_network(h.now, NetworkEvent::NotViable);
    h.drain();
    h.advance(SECOND);
    h.s.handle_network(h.now, NetworkEvent::Viable);
    h.drain();
    let ward = "ward-4b".to_string();
    assert_eq!(path_reports(&h), [(ward.clone(), true), (ward.clone(), false)]);
    // Walking out: the SSID is left; the report names the SSID being left.
    h.s.handle_network(h.now, NetworkEvent::Left);
    h.drain();
    assert_eq!(path_reports(&h).last(), Some(&(ward.clone(), true)));
    // Back on it before the debounce ran out: the path is back, on the same SSID.
    h.s.handle_network(h.now, NetworkEvent::Joined { ssid: ward.clone() });
    h.drain();
    assert_eq!(path_reports(&h).last(), Some(&(ward, false)));
    assert_eq!(path_reports(&h).len(), 4);
    assert_eq!(h.connects(), 1);
}

#[test]
fn the_hellos_say_why_the_previous_session_was_stopped_until_the_server_answers() {
    let mut h = Harness::new(Config {
        previous_stop: "noNetworkAvailable",
        ..config(0)
    });
    h.start();
    h.connected();
    // No answer: the next attempt says it again.
    h.disconnected("connection reset");
    h.sleep();
    h.connected();
    h.server_hello();
    h.disconnected("connection reset");
    h.sleep();
    h.connected();
    let said: Vec<_> = h
        .hellos()
        .iter()
        .map(|hello| hello.previous_stop_reason.clone())
        .collect();
    assert_eq!(said, ["noNetworkAvailable", "noNetworkAvailable", ""]);
}

#[test]
fn long_loss_of_the_path_closes_and_waits_for_the_network_without_timers() {
    let mut h = Harness::new(config(0));
    h.establish();
    h.s.handle_network(h.now, NetworkEvent::NotViable);
    h.sleep();
    assert_eq!(h.elapsed(), TIMING.viability_debounce);
    assert_eq!(h.s.state(), &State::WaitingForNetwork);
    assert_eq!(h.closes(), 1);
    assert_eq!(h.s.poll_timeout(), None, "no wake-ups while there is no network");
    h.advance(Duration::from_secs(600));
    h.s.handle_network(h.now, NetworkEvent::Viable);
    h.drain();
    assert_eq!(h.connects(), 2, "viable again: retry at once");
}

#[test]
fn joining_a_matching_network_retries_at_once_instead_of_waiting_out_the_backoff() {
    let mut h = Harness::new(config(0));
    h.start();
    for _ in 0..10 {
        h.disconnected("no route to host");
        h.sleep();
    }
    h.disconnected("no route to host");
    let State::WaitingToRetry { .. } = h.s.state() else {
        panic!()
    };
    let connects = h.connects();
    // Same SSID and a viable path: nothing new, keep the schedule.
    h.s.handle_network(
        h.now,
        NetworkEvent::Joined {
            ssid: "ward-4b".into(),
        },
    );
    h.drain();
    assert_eq!(h.connects(), connects);
    h.s.handle_network(
        h.now,
        NetworkEvent::Joined {
            ssid: "ward-5a".into(),
        },
    );
    h.drain();
    assert_eq!(h.connects(), connects + 1);
    h.connected();
    assert_eq!(h.hellos().last().unwrap().ssid, "ward-5a");
}

#[test]
fn rejoining_the_network_mid_attempt_starts_a_fresh_attempt() {
    let mut h = Harness::new(config(0));
    h.start();
    h.s.handle_network(h.now, NetworkEvent::NotViable);
    h.drain();
    h.advance(SECOND);
    // The attempt started on the old path may wait seconds for a SYN retransmission.
    let (connects, closes) = (h.connects(), h.closes());
    h.s.handle_network(
        h.now,
        NetworkEvent::Joined {
            ssid: "ward-4b".into(),
        },
    );
    h.drain();
    assert_eq!(h.closes(), closes + 1, "the stale attempt is dropped");
    assert_eq!(h.connects(), connects + 1, "and a new one starts at once");
    assert_eq!(h.s.poll_timeout(), Some(h.now + TIMING.connect_timeout));
}

#[test]
fn the_host_timer_retries_at_once_instead_of_waiting_out_the_backoff() {
    let mut h = Harness::new(config(0));
    h.start();
    for _ in 0..10 {
        h.disconnected("connection refused");
        h.sleep();
    }
    h.disconnected("connection refused");
    let State::WaitingToRetry { retry_in, .. } = *h.s.state() else {
        panic!("{:?}", h.s.state())
    };
    assert!(retry_in > Duration::from_millis(10), "{retry_in:?}");
    let connects = h.connects();
    h.s.handle_system_timer(h.now);
    h.drain();
    assert_eq!(h.connects(), connects + 1);
    assert!(matches!(h.s.state(), State::Connecting { .. }));
}

/// One phone of a fleet with the SDK's default backoff (seeded by `seed`), its server refusing
/// connections for `outage`: how long after the server's return its next attempt starts.
fn back_after(outage: Duration, seed: u64) -> Duration {
    let mut h = Harness::new(Config {
        backoff: BackoffConfig::default(),
        jitter_seed: seed,
        ..config(0)
    });
    h.start();
    loop {
        if matches!(h.s.state(), State::Connecting { .. }) {
            if h.elapsed() >= outage {
                return h.elapsed() - outage;
            }
            h.disconnected("connection refused");
        }
        h.sleep().expect("a refused phone keeps a retry scheduled");
    }
}

#[test]
fn after_an_outage_of_any_length_a_fleet_is_back_within_three_seconds_without_a_stampede() {
    // The goal is every phone back within 5 s of the server's return: 3 s to the next attempt
    // leaves 2 s for the handshakes of the fleet.
    let within = Duration::from_secs(3);
    for (outage, phones) in [(Duration::from_secs(90), 1000), (Duration::from_secs(3600), 300)] {
        let mut back: Vec<Duration> = (0..phones).map(|i| back_after(outage, i)).collect();
        back.sort();
        let last = *back.last().unwrap();
        // Arrivals per 100 ms after the return: spread over the cap, not a wave.
        let mut buckets = vec![0usize; last.as_millis() as usize / 100 + 1];
        for b in &back {
            buckets[b.as_millis() as usize / 100] += 1;
        }
        let busiest = *buckets.iter().max().unwrap();
        println!(
            "outage {outage:?}, {phones} phones: median back after {:?}, last {last:?}, busiest 100 ms {busiest}",
            back[phones as usize / 2]
        );
        assert!(
            last <= within,
            "a phone waited {last:?} after the server's return"
        );
        assert!(
            busiest <= phones as usize / 10,
            "{busiest} of {phones} phones in one 100 ms"
        );
    }
}

#[test]
fn roaming_while_connected_reports_the_new_ssid() {
    let mut h = Harness::new(config(0));
    h.establish();
    h.s.handle_network(
        h.now,
        NetworkEvent::Joined {
            ssid: "ward-5a".into(),
        },
    );
    h.drain();
    let Some(client_frame::Kind::NetworkChange(change)) = &h.sent.last().unwrap().kind else {
        panic!("{:?}", h.sent.last())
    };
    assert_eq!(change.ssid, "ward-5a");
    assert_eq!(h.connects(), 1, "the session survives the roam");
}

#[test]
fn host_timer_is_a_backstop_when_the_path_was_wrongly_reported_unviable() {
    let mut h = Harness::new(config(0));
    h.start();
    h.s.handle_network(h.now, NetworkEvent::NotViable);
    h.sleep();
    assert_eq!(h.s.state(), &State::WaitingForNetwork);
    h.advance(Duration::from_secs(60));
    h.s.handle_system_timer(h.now);
    h.drain();
    assert_eq!(h.connects(), 2);
    // The backstop attempt fails: back to waiting for the network, still no timer of our own.
    h.disconnected("unreachable");
    assert_eq!(h.s.state(), &State::WaitingForNetwork);
    assert_eq!(h.s.poll_timeout(), None);
}

#[test]
fn stop_acks_says_goodbye_closes_and_is_idempotent() {
    let mut h = Harness::new(config(0));
    h.s.handle_stop(h.now, StopReason::HostRequested);
    h.drain();
    assert!(h.events.is_empty(), "stopping an idle session does nothing");
    h.auto_take = false;
    h.establish();
    h.push_message(1, "m1");
    h.s.handle_delivered(h.now, 1);
    h.s.handle_stop(h.now, StopReason::NoNetwork);
    h.drain();
    let tail: Vec<_> = h
        .sent
        .iter()
        .rev()
        .take(2)
        .rev()
        .map(|f| f.kind.clone())
        .collect();
    assert!(matches!(&tail[0], Some(client_frame::Kind::Ack(a)) if a.seqs == [1]));
    assert!(
        matches!(&tail[1], Some(client_frame::Kind::Goodbye(g)) if g.reason == GoodbyeReason::ClientStopping as i32)
    );
    assert_eq!(h.commands.last(), Some(&TransportCommand::Close));
    assert_eq!(
        h.s.state(),
        &State::Stopped(StopCause::Host(StopReason::NoNetwork))
    );
    assert_eq!(h.s.poll_timeout(), None);
    let (sent, commands, events) = (h.sent.len(), h.commands.len(), h.events.len());
    h.s.handle_stop(h.now, StopReason::HostRequested);
    h.drain();
    assert_eq!(
        (h.sent.len(), h.commands.len(), h.events.len()),
        (sent, commands, events)
    );
    // Started again, it connects again with what the app took.
    h.start();
    h.connected();
    assert_eq!(h.hellos().last().unwrap().last_seen_seq, 1);
}

#[test]
fn the_goodbye_carries_the_hosts_stop_reason() {
    for (stop, sent) in [
        (
            HostStop {
                reason: StopReason::NetworkChange,
                provider_reason: "unrecoverableNetworkChange",
            },
            "unrecoverableNetworkChange",
        ),
        (StopReason::HostRequested.into(), ""),
    ] {
        let mut h = Harness::new(config(0));
        h.establish();
        h.s.handle_stop(h.now, stop);
        h.drain();
        let bye = h.sent.iter().rev().find_map(|f| match &f.kind {
            Some(client_frame::Kind::Goodbye(g)) => Some(g.clone()),
            _ => None,
        });
        let bye = bye.expect("a goodbye");
        assert_eq!(
            (bye.provider_stop_reason.as_str(), bye.detail.as_str()),
            (sent, stop.reason.as_str())
        );
        assert_eq!(h.s.state(), &State::Stopped(StopCause::Host(stop.reason)));
    }
}

#[test]
fn protocol_errors_say_goodbye_and_reconnect() {
    let mut h = Harness::new(config(0));
    h.establish();
    // A length prefix far above the negotiated limit.
    h.s.handle_bytes(h.now, &(10_000_000u32).to_be_bytes());
    h.drain();
    assert!(matches!(
        h.sent.last().and_then(|f| f.kind.clone()),
        Some(client_frame::Kind::Goodbye(g)) if g.reason == GoodbyeReason::ProtocolError as i32
    ));
    assert!(matches!(
        h.s.state(),
        State::WaitingToRetry {
            reason: Disconnect::ProtocolError(_),
            ..
        }
    ));
    // A frame before the ServerHello that is not one.
    h.sleep();
    h.connected();
    h.heartbeat(1);
    assert!(matches!(
        h.s.state(),
        State::WaitingToRetry {
            reason: Disconnect::ProtocolError(_),
            ..
        }
    ));
}

#[test]
fn frames_split_anywhere_decode_the_same() {
    let mut h = Harness::new(config(0));
    h.establish();
    let mut wire = BytesMut::new();
    for seq in 1..=3 {
        frame::encode(
            &ServerFrame {
                kind: Some(server_frame::Kind::Push(message(seq, &format!("m{seq}")))),
            },
            &mut wire,
            frame::DEFAULT_MAX_FRAME,
        )
        .unwrap();
    }
    for byte in wire.iter() {
        h.s.handle_bytes(h.now, &[*byte]);
        h.drain();
    }
    assert_eq!(h.shown(), [1, 2, 3]);
}

#[test]
fn an_app_that_lags_stops_the_reads() {
    let mut cfg = config(0);
    cfg.max_pending_events = 3;
    let mut h = Harness::new(cfg);
    h.establish();
    h.drain();
    for seq in 1..=3 {
        let mut buf = BytesMut::new();
        frame::encode(
            &ServerFrame {
                kind: Some(server_frame::Kind::Push(message(seq, &format!("m{seq}")))),
            },
            &mut buf,
            frame::DEFAULT_MAX_FRAME,
        )
        .unwrap();
        assert!(h.s.wants_read());
        h.s.handle_bytes(h.now, &buf);
    }
    assert!(!h.s.wants_read(), "three events queued and not polled");
    h.drain();
    assert!(h.s.wants_read());
}

/// Simulate a server that is unreachable for an hour, with a driver that sleeps until
/// `poll_timeout` each time; returns (wake-ups, connect attempts).
fn unreachable_hour(connect_fails_at_once: bool) -> (usize, usize, Harness) {
    let mut h = Harness::new(config(0));
    h.start();
    let hour = Duration::from_secs(3600);
    loop {
        if connect_fails_at_once && matches!(h.s.state(), State::Connecting { .. }) {
            h.disconnected("connection refused");
        }
        let Some(at) = h.s.poll_timeout() else {
            panic!("an unreachable server must leave a retry scheduled")
        };
        if at - h.t0 > hour {
            break;
        }
        h.sleep();
    }
    (h.wakeups, h.connects(), h)
}

#[test]
fn idle_hour_with_the_server_refusing_wakes_only_on_the_backoff_schedule() {
    let (wakeups, connects, _) = unreachable_hour(true);
    // The schedule, computed independently from the same seed: one wake-up per retry.
    let mut backoff = Backoff::new(BACKOFF, config(0).jitter_seed);
    let (mut t, mut expected) = (Duration::ZERO, 0);
    loop {
        t += backoff.next_delay();
        if t > Duration::from_secs(3600) {
            break;
        }
        expected += 1;
    }
    println!("server refusing for 1 h: {wakeups} wake-ups, {connects} attempts (schedule: {expected})");
    assert_eq!(wakeups, expected);
    assert_eq!(connects, expected + 1, "the start plus one attempt per wake-up");
    // Full jitter capped at 30 s (these tests' backoff) averages 15 s at the cap: about 240 an
    // hour.
    assert!((200..=300).contains(&wakeups), "{wakeups}");
}

#[test]
fn idle_hour_with_the_server_blackholed_adds_only_the_connect_timeouts() {
    let (wakeups, connects, _) = unreachable_hour(false);
    let mut backoff = Backoff::new(BACKOFF, config(0).jitter_seed);
    // Each attempt waits out the connect timeout (one wake-up), then its backoff (another).
    let (mut t, mut expected) = (TIMING.connect_timeout, 1);
    loop {
        t += backoff.next_delay();
        if t > Duration::from_secs(3600) {
            break;
        }
        expected += 1;
        t += TIMING.connect_timeout;
        if t > Duration::from_secs(3600) {
            break;
        }
        expected += 1;
    }
    println!("server blackholed for 1 h: {wakeups} wake-ups, {connects} attempts (schedule: {expected})");
    assert_eq!(wakeups, expected);
    assert_eq!(connects, expected / 2 + 1);
}

#[test]
fn an_hour_without_network_costs_no_wake_up_at_all() {
    let mut h = Harness::new(config(0));
    h.start();
    h.s.handle_network(h.now, NetworkEvent::NotViable);
    // Attempts fail until the debounce runs out; then the session waits for the network.
    for _ in 0..100 {
        if h.s.state() == &State::WaitingForNetwork {
            break;
        }
        if matches!(h.s.state(), State::Connecting { .. }) {
            h.disconnected("network is unreachable");
        }
        h.sleep();
    }
    assert_eq!(h.s.state(), &State::WaitingForNetwork);
    assert_eq!(h.elapsed(), TIMING.viability_debounce);
    let wakeups = h.wakeups;
    h.advance(Duration::from_secs(3600));
    assert_eq!(h.sleep(), None);
    assert_eq!(h.wakeups, wakeups);
}

#[test]
fn the_voip_token_goes_out_after_every_server_hello_and_when_it_changes() {
    let mut cfg = config(0);
    cfg.voip_token = Some("ab01".into());
    let mut h = Harness::new(cfg);
    h.start();
    h.connected();
    let tokens = |h: &Harness| -> Vec<String> {
        h.sent
            .iter()
            .filter_map(|f| match &f.kind {
                Some(client_frame::Kind::VoipToken(t)) => Some(t.token.clone()),
                _ => None,
            })
            .collect()
    };
    assert!(
        tokens(&h).is_empty(),
        "never before the server accepted the hello"
    );
    h.server_hello();
    assert_eq!(tokens(&h), ["ab01"]);
    h.s.handle_voip_token(h.now, "ab01".into());
    h.drain();
    assert_eq!(
        tokens(&h),
        ["ab01"],
        "an unchanged token is not repeated mid-session"
    );
    h.s.handle_voip_token(h.now, "cd02".into());
    h.drain();
    assert_eq!(tokens(&h), ["ab01", "cd02"]);
    // Changed while disconnected: sent after the next ServerHello, once.
    h.disconnected("reset");
    h.s.handle_voip_token(h.now, String::new());
    h.drain();
    assert_eq!(tokens(&h).len(), 2);
    h.sleep();
    h.reconnect();
    assert_eq!(tokens(&h), ["ab01", "cd02", ""]);
}

/// Found by the `sdk_core` fuzz target: a `ServerHello` with a server clock far in the past and
/// a call invite with a deadline far in the future overflowed the remaining ring time.
#[test]
fn ring_time_does_not_overflow_on_extreme_server_clocks() {
    let mut h = Harness::new(config(0));
    h.start();
    h.connected();
    h.server(server_frame::Kind::ServerHello(ServerHello {
        session_id: "s1".into(),
        device_id: "dev-1".into(),
        server_time_ms: i64::MIN,
        ..Default::default()
    }));
    h.server(server_frame::Kind::Push(call_invite(1, "c", i64::MAX)));
    let Some(Event::CallInvite(invite)) = h.events.iter().find(|e| matches!(e, Event::CallInvite(_))) else {
        panic!("no invite")
    };
    assert_eq!(invite.ring_remaining, Duration::from_millis(i64::MAX as u64));
}

/// The floor events since `from`, as the host would persist them.
fn persisted(h: &Harness, from: usize) -> Vec<LastSeen> {
    h.events[from..]
        .iter()
        .filter_map(|e| match e {
            Event::LastSeenSeq(s) => Some(*s),
            _ => None,
        })
        .collect()
}

#[test]
fn the_epoch_of_the_server_hello_goes_into_the_next_hello() {
    let mut h = Harness::new(resume(LastSeen::default()));
    h.start();
    h.connected();
    assert_eq!(h.hellos()[0].epoch, 0, "a new install knows no epoch");
    h.server_hello_of(7);
    // Persisted at once: the server renumbered above the floor, so the pair holds already.
    assert_eq!(persisted(&h, 0), [LastSeen { epoch: 7, seq: 0 }]);
    h.push_message(1, "m1");
    assert_eq!(h.s.last_seen(), LastSeen { epoch: 7, seq: 1 });
    h.disconnected("reset");
    h.sleep();
    let events = h.events.len();
    h.connected();
    h.server_hello_of(7);
    let hello = h.hellos()[1].clone();
    assert_eq!((hello.epoch, hello.last_seen_seq), (7, 1));
    assert!(
        persisted(&h, events).is_empty(),
        "the same epoch again changes nothing"
    );
}

#[test]
fn a_new_epoch_replaces_the_old_one_and_keeps_the_floor() {
    let mut h = Harness::new(resume(LastSeen { epoch: 3, seq: 10 }));
    h.start();
    h.connected();
    let hello = h.hellos()[0].clone();
    assert_eq!((hello.epoch, hello.last_seen_seq), (3, 10));
    // The store was restored: new epoch, and its queued pushes renumbered above 10.
    h.server_hello_of(9);
    assert!(matches!(h.s.state(), State::Connected { .. }));
    assert_eq!(persisted(&h, 0), [LastSeen { epoch: 9, seq: 10 }]);
    h.push_message(11, "m11");
    assert_eq!(h.shown(), [11]);
    assert_eq!(persisted(&h, 0).last(), Some(&LastSeen { epoch: 9, seq: 11 }));
    h.disconnected("reset");
    h.sleep();
    h.reconnect();
    assert_eq!(h.hellos()[1].epoch, 9, "the old epoch is never sent again");
}

/// The app takes a push after the hello went out and before a `ServerHello` of another epoch:
/// that sequence belongs to the old numbering, so the pair goes back to the floor the hello
/// carried, the old ack is not sent, and the new store's pushes above that floor all count.
#[test]
fn the_persisted_pair_never_mixes_numberings() {
    let mut h = Harness::new(config(0));
    h.auto_take = false;
    h.establish();
    h.push_message(1, "m1");
    h.push_message(2, "m2");
    assert!(h.take(1));
    h.disconnected("reset");
    h.sleep();
    h.connected();
    assert_eq!(h.hellos()[1].last_seen_seq, 1);
    assert!(h.take(2));
    assert_eq!(h.s.last_seen(), LastSeen { epoch: EPOCH, seq: 2 });
    let (events, acks) = (h.events.len(), h.acked().len());
    h.server_hello_of(5);
    assert_eq!(persisted(&h, events), [LastSeen { epoch: 5, seq: 1 }]);
    assert_eq!(
        h.acked().len(),
        acks,
        "2 of the old numbering is not acked to the new store"
    );
    // The new store's 2 is another push; the old 2, renumbered to 3, is dropped by its id.
    h.push_message(2, "other");
    h.push_message(3, "m2");
    assert_eq!(h.shown(), [1, 2, 2]);
    assert_eq!(h.acked()[acks..], [3]);
    assert!(h.take(2));
    assert_eq!(h.acked()[acks..], [3, 2]);
    assert_eq!(h.s.last_seen(), LastSeen { epoch: 5, seq: 3 });
    assert_eq!(persisted(&h, events).last(), Some(&h.s.last_seen()));
}
