//! Every Prometheus metric the server exports: names, help texts, and one small function per
//! thing that happens, called at the place that decides it (hub, session driver, listener,
//! fallback, store, admission, API). Nothing else in the crate names a metric. A leaf: it
//! depends on no other module of the crate (callers pass labels as strings), so every layer may
//! call it.
//!
//! The recorder is process-wide (the `metrics` facade has one global recorder), built here
//! without the exporter's own HTTP server: `/metrics` on the dashboard listener renders it.
//! Gauges that describe state (sessions online, queue depth) are set from the hub at scrape
//! time, so they cannot drift.

use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// TLS handshakes on the device listener, by `result` (`ok`, `failed`, `timeout`).
pub(crate) const HANDSHAKES: &str = "lpush_tls_handshakes_total";
/// Device TLS handshakes that resumed an earlier session with a TLS 1.3 ticket (also counted
/// in [`HANDSHAKES`] as `ok`).
pub(crate) const HANDSHAKES_RESUMED: &str = "lpush_tls_resumed_total";
/// Connections closed before their TLS handshake, by `listener` (`device`, `api`,
/// `dashboard`) and `reason` (`in_progress`, `in_progress_per_ip`, `rate`, `rate_per_ip`,
/// `too_many_sources`); see `config::HandshakeLimits`.
pub(crate) const HANDSHAKES_REFUSED: &str = "lpush_handshakes_refused_total";
/// gRPC requests refused `RESOURCE_EXHAUSTED` because their API key was over its rate.
pub(crate) const API_RATE_LIMITED: &str = "lpush_api_requests_rate_limited_total";
/// Device logins, by `result` (`ok`, `auth_failed`, `revoked`, `rate_limited`).
pub(crate) const LOGINS: &str = "lpush_logins_total";
/// Sessions that ended, by `reason` (see [`reason_class`]).
pub(crate) const SESSIONS_ENDED: &str = "lpush_sessions_ended_total";
/// Sessions an iOS provider ended with a goodbye saying why iOS stopped it, by `reason`
/// (Apple's `NEProviderStopReason` case name, or `unknown`).
pub(crate) const PROVIDER_STOPS: &str = "lpush_provider_stops_total";
/// Sessions that ended because the phone left the Wi-Fi (a stop for a network reason, or
/// heartbeat silence after the phone reported a network change): not a fault.
pub(crate) const LEFT_WIFI: &str = "lpush_sessions_left_wifi_total";
/// Live sessions now.
pub(crate) const SESSIONS_ONLINE: &str = "lpush_sessions_online";
/// Registered devices now (revoked included).
pub(crate) const DEVICES: &str = "lpush_devices_registered";
/// Pushes queued and not final, all devices.
pub(crate) const QUEUED: &str = "lpush_queued_pushes";
/// Largest queue of one device.
pub(crate) const QUEUED_MAX: &str = "lpush_queued_pushes_max_per_device";
/// Heartbeats a live session did not answer in time (the session ends `HEARTBEAT_TIMEOUT`).
pub(crate) const HEARTBEAT_MISSES: &str = "lpush_heartbeat_misses_total";
/// Pushes accepted for a device, by `kind` (`message`, `call_invite`, `call_cancel`).
pub(crate) const ACCEPTED: &str = "lpush_pushes_accepted_total";
/// Pushes that reached a device, by `kind` and `path` (`local`, `apns`).
pub(crate) const DELIVERED: &str = "lpush_pushes_delivered_total";
/// Final receipts, by `kind` and `state` (`acked`, `expired`, ...).
pub(crate) const FINAL: &str = "lpush_pushes_final_total";
/// Accepted to delivered, by `kind` and `path`.
pub(crate) const DELIVERY_LATENCY: &str = "lpush_delivery_latency_seconds";
/// Accepted to acknowledged by the device, by `kind`.
pub(crate) const ACK_LATENCY: &str = "lpush_ack_latency_seconds";
/// VoIP pushes handed to the APNs bridge, by `outcome`.
pub(crate) const VOIP: &str = "lpush_voip_pushes_total";
/// Pushes other than call invites that reached the VoIP fallback's gate (and were stopped
/// there: a VoIP push not reported as a call gets the app killed). Must stay 0: alert on any
/// increase, it means the hub routed a message or cancel towards APNs.
pub(crate) const VOIP_NON_CALL: &str = "lpush_voip_non_call_pushes_total";
/// Store group commits, by `result` (`ok`, `failed`).
pub(crate) const STORE_COMMITS: &str = "lpush_store_commits_total";
/// 1 if the store's last commit succeeded, else 0.
pub(crate) const STORE_OK: &str = "lpush_store_last_commit_ok";
/// Time of one store group commit (fsync included).
pub(crate) const STORE_COMMIT_LATENCY: &str = "lpush_store_commit_seconds";
/// Diagnoses raised, by `kind` (`instance_churn`, `heartbeat_silent`, `site_drop`).
pub(crate) const DIAGNOSES: &str = "lpush_diagnoses_total";
/// Devices currently flagged, by `kind` (`instance_churn`, `heartbeat_silent`).
pub(crate) const FLAGGED_DEVICES: &str = "lpush_flagged_devices";
/// Sites (SSIDs) currently flagged for a site-wide drop.
pub(crate) const FLAGGED_SITES: &str = "lpush_flagged_sites";
/// Open dashboard live-update streams.
pub(crate) const SSE_CLIENTS: &str = "lpush_dashboard_streams";
/// Cluster mode: time of one Redis request made by the hub, by `op`.
pub(crate) const REDIS_LATENCY: &str = "lpush_redis_request_seconds";
/// Cluster mode: Redis requests that failed (unreachable, refused), by `op`.
pub(crate) const REDIS_ERRORS: &str = "lpush_redis_errors_total";
/// Cluster mode: 1 while this node's last heartbeat reached Redis.
pub(crate) const REDIS_UP: &str = "lpush_redis_up";
/// Cluster mode: routing and ownership events, by `event` (`forwarded`, `drained`, `claimed`,
/// `released`, `kicked`, `fenced`, `swept`).
pub(crate) const CLUSTER_EVENTS: &str = "lpush_cluster_events_total";
/// Cluster mode: nodes whose heartbeat is current, as this node sees them.
pub(crate) const CLUSTER_NODES: &str = "lpush_cluster_nodes_alive";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide recorder once and return its handle (later calls return the same
/// handle). Latencies are exported as histograms with buckets from 1 ms to 30 s.
pub(crate) fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            // Redis answers on the local network in tens of microseconds.
            let redis = [
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REDIS_LATENCY.into()), &redis)
                .expect("non-empty buckets")
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .expect("non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_histogram!(
        REDIS_LATENCY,
        "Cluster mode: time of one Redis request made by the hub, by op."
    );
    describe_counter!(REDIS_ERRORS, "Cluster mode: Redis requests that failed, by op.");
    describe_gauge!(
        REDIS_UP,
        "Cluster mode: 1 while this node's heartbeat reaches Redis."
    );
    describe_counter!(
        CLUSTER_EVENTS,
        "Cluster mode: routing and ownership events, by event."
    );
    describe_gauge!(CLUSTER_NODES, "Cluster mode: nodes whose heartbeat is current.");
    describe_counter!(HANDSHAKES, "TLS handshakes on the device listener, by result.");
    describe_counter!(
        HANDSHAKES_RESUMED,
        "Device TLS handshakes that resumed a session with a ticket (counted as ok too)."
    );
    describe_counter!(
        HANDSHAKES_REFUSED,
        "Connections closed before their TLS handshake by a handshake limit, by listener and reason."
    );
    describe_counter!(
        API_RATE_LIMITED,
        "gRPC requests refused because their API key was over its request rate."
    );
    describe_counter!(LOGINS, "Device logins, by result.");
    describe_counter!(SESSIONS_ENDED, "Device sessions that ended, by reason.");
    describe_counter!(
        PROVIDER_STOPS,
        "Sessions iOS stopped, by its NEProviderStopReason."
    );
    describe_counter!(LEFT_WIFI, "Sessions that ended because the phone left the Wi-Fi.");
    describe_gauge!(SESSIONS_ONLINE, "Live device sessions.");
    describe_gauge!(DEVICES, "Registered devices.");
    describe_gauge!(QUEUED, "Pushes queued and not yet final, all devices.");
    describe_gauge!(QUEUED_MAX, "Largest queue of one device.");
    describe_counter!(
        HEARTBEAT_MISSES,
        "Heartbeats not answered in time (session ended)."
    );
    describe_counter!(ACCEPTED, "Pushes accepted for a device, by kind.");
    describe_counter!(DELIVERED, "Pushes that reached a device, by kind and path.");
    describe_counter!(FINAL, "Final receipts, by kind and state.");
    describe_histogram!(
        DELIVERY_LATENCY,
        metrics::Unit::Seconds,
        "Accepted to delivered, by kind and path."
    );
    describe_histogram!(
        ACK_LATENCY,
        metrics::Unit::Seconds,
        "Accepted to acknowledged, by kind."
    );
    describe_counter!(VOIP, "VoIP pushes handed to the APNs bridge, by outcome.");
    describe_counter!(
        VOIP_NON_CALL,
        "Non-call pushes stopped at the VoIP fallback's gate; must stay 0."
    );
    describe_counter!(STORE_COMMITS, "Store group commits, by result.");
    describe_gauge!(STORE_OK, "1 if the store's last commit succeeded.");
    describe_histogram!(
        STORE_COMMIT_LATENCY,
        metrics::Unit::Seconds,
        "Store group commit time."
    );
    describe_counter!(DIAGNOSES, "Diagnoses raised, by kind.");
    describe_gauge!(FLAGGED_DEVICES, "Devices currently flagged, by kind.");
    describe_gauge!(FLAGGED_SITES, "Sites currently flagged for a site-wide drop.");
    describe_gauge!(SSE_CLIENTS, "Open dashboard live-update streams.");
    // Exported from the start, so "0" is visible and alertable rather than absent.
    counter!(VOIP_NON_CALL).increment(0);
    counter!(HEARTBEAT_MISSES).increment(0);
    gauge!(STORE_OK).set(1.0);
}

/// A short, bounded label for why a session ended (the reason strings are free text).
pub(crate) fn reason_class(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("heartbeat") {
        "heartbeat_timeout"
    } else if r.contains("replaced") {
        "replaced"
    } else if r.contains("revoked") {
        "revoked"
    } else if r.contains("shutdown") || r.contains("shutting down") {
        "shutdown"
    } else if r.starts_with("device goodbye") {
        "device_goodbye"
    } else if r.contains("connection closed") {
        "connection_closed"
    } else if r.contains("write") {
        "write_failed"
    } else if r.contains("read failed") || r.contains("socket error") {
        "network_error"
    } else if r.contains("protocol") {
        "protocol_error"
    } else {
        "other"
    }
}

/// A device TLS handshake finished (`ok`, `failed`, `timeout`).
pub(crate) fn handshake(result: &'static str) {
    counter!(HANDSHAKES, "result" => result).increment(1);
}

/// A device TLS handshake resumed a session with a ticket.
pub(crate) fn handshake_resumed() {
    counter!(HANDSHAKES_RESUMED).increment(1);
}

/// A connection was closed before its TLS handshake by a limit of `listener`.
pub(crate) fn handshake_refused(listener: &'static str, reason: &'static str) {
    counter!(HANDSHAKES_REFUSED, "listener" => listener, "reason" => reason).increment(1);
}

/// A gRPC request was refused: its API key was over its rate.
pub(crate) fn api_rate_limited() {
    counter!(API_RATE_LIMITED).increment(1);
}

/// A hello was answered (`ok`, `auth_failed`, `revoked`, `rate_limited`).
pub(crate) fn login(result: &'static str) {
    counter!(LOGINS, "result" => result).increment(1);
}

/// A session ended.
pub(crate) fn session_ended(reason: &str) {
    let class = reason_class(reason);
    counter!(SESSIONS_ENDED, "reason" => class).increment(1);
    if class == "heartbeat_timeout" {
        counter!(HEARTBEAT_MISSES).increment(1);
    }
}

/// A session ended as an iOS provider stopped for `reason` (a known name or `unknown`), and
/// whether the phone `left` the Wi-Fi.
pub(crate) fn session_stopped(reason: &'static str, left: bool) {
    if !reason.is_empty() {
        counter!(PROVIDER_STOPS, "reason" => reason).increment(1);
    }
    if left {
        counter!(LEFT_WIFI).increment(1);
    }
}

/// A push was queued for a device.
pub(crate) fn accepted(kind: &'static str) {
    counter!(ACCEPTED, "kind" => kind).increment(1);
}

/// A push reached a device `ms` after it was accepted.
pub(crate) fn delivered(kind: &'static str, path: &'static str, ms: i64) {
    counter!(DELIVERED, "kind" => kind, "path" => path).increment(1);
    histogram!(DELIVERY_LATENCY, "kind" => kind, "path" => path).record(ms.max(0) as f64 / 1000.0);
}

/// The device acknowledged a push `ms` after it was accepted.
pub(crate) fn acked(kind: &'static str, ms: i64) {
    histogram!(ACK_LATENCY, "kind" => kind).record(ms.max(0) as f64 / 1000.0);
}

/// A push got its final receipt.
pub(crate) fn finished(kind: &'static str, state: &'static str) {
    counter!(FINAL, "kind" => kind, "state" => state).increment(1);
}

/// A VoIP push was handed to the bridge and came back with `outcome`.
pub(crate) fn voip(outcome: &'static str) {
    counter!(VOIP, "outcome" => outcome).increment(1);
}

/// A push that is not a call invite reached the VoIP fallback's gate and was stopped there.
pub(crate) fn voip_non_call() {
    counter!(VOIP_NON_CALL).increment(1);
}

/// A store group commit finished.
pub(crate) fn store_commit(ok: bool, seconds: f64) {
    counter!(STORE_COMMITS, "result" => if ok { "ok" } else { "failed" }).increment(1);
    gauge!(STORE_OK).set(if ok { 1.0 } else { 0.0 });
    histogram!(STORE_COMMIT_LATENCY).record(seconds);
}

/// Cluster mode: a Redis request made by the hub finished.
pub(crate) fn redis_request(op: &'static str, ok: bool, seconds: f64) {
    histogram!(REDIS_LATENCY, "op" => op).record(seconds);
    if !ok {
        counter!(REDIS_ERRORS, "op" => op).increment(1);
    }
}

/// Cluster mode: whether this node's heartbeat reached Redis, and how many nodes are alive.
pub(crate) fn redis_health(up: bool, nodes_alive: usize) {
    gauge!(REDIS_UP).set(if up { 1.0 } else { 0.0 });
    gauge!(CLUSTER_NODES).set(nodes_alive as f64);
}

/// Cluster mode: a routing or ownership event.
pub(crate) fn cluster(event: &'static str) {
    counter!(CLUSTER_EVENTS, "event" => event).increment(1);
}

/// A diagnosis was raised.
pub(crate) fn diagnosis(kind: &'static str) {
    counter!(DIAGNOSES, "kind" => kind).increment(1);
}

/// State gauges, set at scrape time.
pub(crate) struct Snapshot {
    /// Live sessions.
    pub sessions_online: usize,
    /// Registered devices.
    pub devices: usize,
    /// Queued pushes.
    pub queued: usize,
    /// Largest queue of one device.
    pub queued_max: usize,
    /// Devices flagged for instance churn.
    pub churn_flagged: usize,
    /// Devices flagged for heartbeat silence.
    pub heartbeat_flagged: usize,
    /// Sites flagged for a site-wide drop.
    pub sites_flagged: usize,
    /// Open live-update streams.
    pub streams: usize,
}

/// Set the state gauges and render the exposition text.
pub(crate) fn render(handle: &PrometheusHandle, s: &Snapshot) -> String {
    gauge!(SESSIONS_ONLINE).set(s.sessions_online as f64);
    gauge!(DEVICES).set(s.devices as f64);
    gauge!(QUEUED).set(s.queued as f64);
    gauge!(QUEUED_MAX).set(s.queued_max as f64);
    gauge!(FLAGGED_DEVICES, "kind" => "instance_churn").set(s.churn_flagged as f64);
    gauge!(FLAGGED_DEVICES, "kind" => "heartbeat_silent").set(s.heartbeat_flagged as f64);
    gauge!(FLAGGED_SITES).set(s.sites_flagged as f64);
    gauge!(SSE_CLIENTS).set(s.streams as f64);
    handle.run_upkeep();
    handle.render()
}

#[cfg(test)]
mod tests {
    /// The Grafana dashboard in the repository queries only metrics this module exports.
    #[test]
    fn grafana_dashboard_uses_exported_names() {
        let grafana = include_str!("../../deploy/grafana/push-server.json");
        let source = include_str!("metrics.rs");
        let mut rest = grafana;
        let mut checked = 0;
        while let Some(i) = rest.find("lpush_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            let base = name.strip_suffix("_bucket").unwrap_or(&name);
            assert!(source.contains(&format!("\"{base}\"")), "{name} is not exported");
            checked += 1;
        }
        assert!(checked > 20);
    }
}
