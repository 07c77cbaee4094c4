//! How the commands print: tables and lines for people, JSON for `--json`.

use push_proto::sender::{ApiKeyInfo, CallState, CallStatus, DeliveryState, DeliveryUpdate, DeviceInfo};

/// `value` as pretty JSON on stdout, for `--json`.
pub fn print_json(value: serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// A proto enum value as the CLI names it: `DELIVERY_STATE_ACKED` -> `acked`.
pub fn short_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

pub fn state_name(state: DeliveryState) -> String {
    short_name(state.as_str_name(), "DELIVERY_STATE_")
}

pub fn update_json(u: &DeliveryUpdate) -> serde_json::Value {
    serde_json::json!({
        "device_id": u.device_id,
        "state": state_name(u.state()),
        "reason": u.reason,
        "at_ms": u.at_ms,
        "path": u.path,
    })
}

pub fn device_json(d: &DeviceInfo) -> serde_json::Value {
    serde_json::json!({
        "device_id": d.device_id,
        "groups": d.groups,
        "online": d.online,
        "revoked": d.revoked,
        "last_seen_ms": d.last_seen_ms,
        "ssid": d.ssid,
        "session_age_seconds": d.session_age_seconds,
        "sdk_version": d.sdk_version,
        "clock_offset_ms": d.clock_offset_ms,
        "last_disconnect_reason": d.last_disconnect_reason,
        "queued": d.queued,
        "voip_token": short_name(d.voip_token().as_str_name(), "VOIP_TOKEN_STATE_"),
        "node": d.node,
    })
}

pub fn key_json(k: &ApiKeyInfo) -> serde_json::Value {
    serde_json::json!({
        "key_id": k.key_id,
        "name": k.name,
        "state": short_name(k.state().as_str_name(), "API_KEY_STATE_"),
        "scopes": k.scopes,
        "enroll_groups": k.enroll_groups,
        "created_at_ms": k.created_at_ms,
        "expires_at_ms": k.expires_at_ms,
        "revoked_at_ms": k.revoked_at_ms,
    })
}

/// Unix ms as UTC text, or `none` for 0.
pub fn when(ms: i64, none: &str) -> String {
    if ms == 0 {
        none.into()
    } else {
        push_server::hub::fmt_utc(ms)
    }
}

/// The local time zone's offset from UTC at Unix ms `ms`, seconds (0 if unknown).
pub fn local_offset_secs(ms: i64) -> i64 {
    let t = ms.div_euclid(1000) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value (integers and a null zone name).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and writes only `tm`, both live for the call.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    // `c_long`: i64 on the 64-bit targets we build for.
    if ok { tm.tm_gmtoff as i64 } else { 0 }
}

/// Unix ms as `HH:MM:SS.mmm` at `offset_secs` from UTC.
pub fn clock_at(ms: i64, offset_secs: i64) -> String {
    let local = ms + offset_secs * 1000;
    let utc = push_server::hub::fmt_utc(local); // YYYY-MM-DDTHH:MM:SSZ
    format!("{}.{:03}", &utc[11..19], local.rem_euclid(1000))
}

/// Unix ms as local `HH:MM:SS.mmm`, or `-` for 0.
pub fn clock(ms: i64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        clock_at(ms, local_offset_secs(ms))
    }
}

/// Unix ms as local `YYYY-MM-DD HH:MM:SS`, or `-` for 0.
pub fn local_datetime(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let utc = push_server::hub::fmt_utc(ms + local_offset_secs(ms) * 1000);
    format!("{} {}", &utc[..10], &utc[11..19])
}

/// A length of time in ms, for people: `2.35 s`, `1 min 5 s`.
pub fn span(ms: i64) -> String {
    if ms < 60_000 {
        format!("{:.2} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000)
    }
}

pub fn call_state_name(state: CallState) -> &'static str {
    state.as_str_name().trim_start_matches("CALL_STATE_")
}

/// One `call --wait` line for a callee's change: when, who, what, which step, which path.
pub fn update_line(u: &DeliveryUpdate) -> String {
    let state = u.state().as_str_name().trim_start_matches("DELIVERY_STATE_");
    let path = if u.path.is_empty() { "-" } else { &u.path };
    let line = format!(
        "{}  {:<24} {:<13} step {}  {:<5}  {}",
        clock(u.at_ms),
        u.device_id,
        state,
        u.step,
        path,
        u.reason
    );
    line.trim_end().to_string()
}

/// The outcome of a call, then its steps and callees, as `call --wait` ends.
pub fn status_lines(s: &CallStatus) -> Vec<String> {
    let mut head = format!("call {} {}", s.call_id, call_state_name(s.state()));
    if s.state() == CallState::Answered {
        let ended = s.ended_at_ms.max(s.placed_at_ms);
        head += &format!(
            " by {} at {}, {} after it was placed",
            s.answered_by,
            clock(ended),
            span(ended - s.placed_at_ms)
        );
    } else if s.ended_at_ms > 0 {
        head += &format!(" at {}", clock(s.ended_at_ms));
    }
    head += &format!(" (placed {})", clock(s.placed_at_ms));
    let mut lines = vec![head];
    for step in &s.steps {
        let rang = if step.started_at_ms > 0 {
            format!("rang {}", clock(step.started_at_ms))
        } else {
            "did not ring".into()
        };
        lines.push(format!(
            "  step {}  due {}  {}  {}{}",
            step.index,
            clock(step.due_at_ms),
            rang,
            step.device_ids.join(", "),
            if step.stop_earlier {
                " (stops earlier steps)"
            } else {
                ""
            }
        ));
    }
    lines.extend(s.callees.iter().map(|u| format!("  {}", update_line(u))));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_wall_clock_with_milliseconds() {
        // 2024-03-05T12:31:05.120Z
        let ms = 1_709_641_865_120;
        assert_eq!(clock_at(ms, 0), "12:31:05.120");
        assert_eq!(clock_at(ms, 3600), "13:31:05.120");
        assert_eq!(clock_at(ms, -13 * 3600), "23:31:05.120", "the day before");
        assert_eq!(clock_at(ms + 7, 0), "12:31:05.127");
        assert_eq!(clock(0), "-");
        assert_eq!(span(2_345), "2.35 s");
        assert_eq!(span(65_400), "1 min 5 s");
    }

    #[test]
    fn the_outcome_names_who_answered_and_how_fast() {
        let s = CallStatus {
            call_id: "c1".into(),
            state: CallState::Answered as i32,
            answered_by: "nurse-a".into(),
            placed_at_ms: 1_709_641_865_120,
            ended_at_ms: 1_709_641_867_470,
            steps: vec![push_proto::sender::CallStep {
                index: 1,
                due_at_ms: 1_709_641_895_120,
                started_at_ms: 0,
                stop_earlier: true,
                device_ids: vec!["charge".into()],
            }],
            callees: vec![DeliveryUpdate {
                device_id: "nurse-a".into(),
                state: push_proto::sender::DeliveryState::Answered as i32,
                at_ms: 1_709_641_867_470,
                path: "local".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let lines = status_lines(&s);
        assert!(
            lines[0].starts_with("call c1 ANSWERED by nurse-a at "),
            "{lines:?}"
        );
        assert!(lines[0].contains(", 2.35 s after it was placed"), "{lines:?}");
        assert!(
            lines[1].contains("did not ring  charge (stops earlier steps)"),
            "{lines:?}"
        );
        assert!(
            lines[2].contains("nurse-a") && lines[2].contains("ANSWERED      step 0  local"),
            "{lines:?}"
        );
        assert!(
            lines.iter().all(|l| !l.contains("1709641")),
            "no raw Unix ms: {lines:?}"
        );
    }
}
