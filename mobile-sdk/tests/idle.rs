//! The driver with the server unreachable for a simulated hour, on tokio's paused clock: it
//! wakes exactly on the backoff schedule and never spins.

use std::{sync::Arc, time::Duration};

use mobile_sdk::{
    ClientConfig, EventHandler, Registry, Trust,
    core::{Backoff, BackoffConfig, Event, StopReason},
};

struct Ignore;

impl EventHandler for Ignore {
    fn on_event(&self, _: Event) {}
}

const SEED: u64 = 0x1d1e;
const HOUR: Duration = Duration::from_secs(3600);

/// A port on which nothing listens: connections are refused at once.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Wake-ups of the backoff schedule within `within`, when every attempt fails at once.
fn schedule(backoff: BackoffConfig, within: Duration) -> u64 {
    let mut b = Backoff::new(backoff, SEED);
    let (mut t, mut wakeups) = (Duration::ZERO, 0);
    loop {
        t += b.next_delay();
        if t > within {
            return wakeups;
        }
        wakeups += 1;
    }
}

#[tokio::test(start_paused = true)]
async fn an_hour_with_the_server_refusing_wakes_only_on_the_backoff_schedule() {
    let registry = Registry::new(tokio::runtime::Handle::current());
    let pin = format!("sha256/{}", "A".repeat(43) + "=");
    let mut config = ClientConfig::new("127.0.0.1", closed_port(), "dev-idle", "cred", Trust::pins([pin]));
    config.jitter_seed = Some(SEED);
    let backoff = config.backoff;
    let client = registry.client(config, Arc::new(Ignore)).unwrap();
    client.start().await.unwrap();
    // The paused clock jumps from one timer to the next; only the session's timer is pending.
    tokio::time::sleep(HOUR).await;
    let stats = client.stats();
    let expected = schedule(backoff, HOUR);
    println!("1 simulated hour, server refusing: {stats:?}; schedule: {expected} wake-ups");
    assert_eq!(
        stats.timer_wakeups, expected,
        "one wake-up per scheduled retry, no more"
    );
    assert_eq!(
        stats.connect_attempts,
        expected + 1,
        "the start, then one per wake-up"
    );
    // Each attempt costs a handful of loop turns (connect, fail, events); a spin would not.
    assert!(stats.loop_turns <= 6 * stats.connect_attempts, "{stats:?}");
    client.stop(StopReason::HostRequested).await;
    assert!(registry.counters().is_quiet());
}
