//! How simulated time passes (`advance`): the plan of each stop, as pure functions of the time.
//!
//! The server's clock jumps to the end of the span at once (everything due on it fires). The
//! phone's clock (the SDK's [`mobile_sdk::Clock`], shared by every extension process of the
//! phone) is stepped: from one stop to the next, where a stop is the SDK's next deadline (a
//! retry, a connect timeout), iOS's next 60 s timer event, or the end. At each stop the due timer
//! events fire (consecutive ones with nothing in between collapsed to [`MAX_COLLAPSED`]) and
//! the host waits until the SDK handled everything and parked, so a reconnecting phone's
//! backoff plays out attempt by attempt against the real network. A phone that is connected,
//! or has nothing scheduled (stopped, waiting for the network, no process), leaps to the end:
//! its connection is counted as heard from across the jump.

use std::time::{Duration, Instant};

/// iOS calls `handleTimerEvent` about every 60 s while the provider runs.
pub const TIMER_PERIOD: Duration = Duration::from_secs(60);

/// Consecutive timer events with nothing in between are fired at most this many times.
pub const MAX_COLLAPSED: u64 = 3;

/// Where the phone's clock goes next, from the SDK's state after the last stop: its earliest
/// deadline if it is reconnecting (`None` when connected or nothing is scheduled), iOS's next
/// timer event and the end of the span.
pub fn next_stop(end: Instant, sdk_deadline: Option<Instant>, next_timer: Instant) -> Instant {
    match sdk_deadline {
        None => end,
        Some(d) => end.min(d).min(next_timer),
    }
}

/// Timer events due at `now` when the next one was due at `next_timer`: how many fell due, how
/// many of them fire (collapsed), and when the one after is due.
pub fn timer_events(now: Instant, next_timer: Instant) -> (u64, u64, Instant) {
    if now < next_timer {
        return (0, 0, next_timer);
    }
    let period = TIMER_PERIOD.as_millis();
    let due = 1 + u64::try_from(now.duration_since(next_timer).as_millis() / period).unwrap_or(u64::MAX);
    let next = next_timer + TIMER_PERIOD * u32::try_from(due).unwrap_or(u32::MAX);
    (due, due.min(MAX_COLLAPSED), next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnecting_phone_stops_at_each_deadline_and_timer_event() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let end = t0 + s(1800);
        // Retry in 4 s, timer in 60 s: the retry first.
        assert_eq!(next_stop(end, Some(t0 + s(4)), t0 + s(60)), t0 + s(4));
        // Retry (capped backoff) after the timer event: the timer event first.
        assert_eq!(next_stop(end, Some(t0 + s(90)), t0 + s(60)), t0 + s(60));
        // Nothing left in the span: the end.
        assert_eq!(next_stop(t0 + s(30), Some(t0 + s(40)), t0 + s(60)), t0 + s(30));
        // Connected, or nothing scheduled: straight to the end, over every timer event.
        assert_eq!(next_stop(end, None, t0 + s(60)), end);
    }

    #[test]
    fn timer_events_fall_due_every_minute_and_collapse_to_three() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(timer_events(t0 + s(59), t0 + s(60)), (0, 0, t0 + s(60)));
        assert_eq!(timer_events(t0 + s(60), t0 + s(60)), (1, 1, t0 + s(120)));
        assert_eq!(timer_events(t0 + s(179), t0 + s(60)), (2, 2, t0 + s(180)));
        // Thirty minutes in one leap: 30 fell due, 3 fire, the next is at 31 min.
        assert_eq!(timer_events(t0 + s(1800), t0 + s(60)), (30, 3, t0 + s(1860)));
    }
}
