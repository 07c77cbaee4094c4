//! The ops dashboard and `/metrics`, served over HTTPS (TLS 1.3, the server's certificate,
//! ALPN http/1.1) on `http_listen` with axum.
//!
//! - Static page, script and style are embedded in the binary: no build step, no CDN.
//! - Login: an API key with the `read` scope (read-only) or `admin` (may revoke devices) is
//!   exchanged for a random session id in an `HttpOnly; Secure; SameSite=Strict` cookie. Keys and
//!   cookies are never logged. State-changing requests made with the cookie also need the
//!   `x-lpush-csrf: 1` header (a cross-site form cannot set it; SameSite=Strict already keeps
//!   the cookie off cross-site requests).
//! - API clients and Prometheus may send `Authorization: Bearer <api key>` instead of a cookie.
//! - The device table comes a page at a time (`GET /api/devices`, filtered, searched and sorted
//!   here, see [`listing`]); JSON is gzip-compressed for clients that accept it.
//! - Live updates: Server-Sent Events fed by the hub's presence and receipt broadcasts and the
//!   observer's diagnoses, batched every [`CHANGES_EVERY`] into one `changed` event naming the
//!   devices that changed (the page refetches its visible rows when they concern it).
//! - `POST /v1/enroll` (Bearer key with the `enroll` or `admin` scope, JSON body
//!   `{"deviceId", "groups", "validDays"}`): the enrollment as an XML property list, for
//!   container apps that speak HTTPS but not gRPC (see [`super::enrollment`]).
//! - Sessions remember the key's hash, not the key, and re-check it on every request (through
//!   [`Keys`], so a revocation here is seen at once): a revoked or expired key's sessions are
//!   logged out and its event streams end. `GET /api/enrollments` lists recent enrollments;
//!   admins list keys (`GET /api/keys`, ids only) and revoke them (`POST /api/keys/{id}/revoke`).
//! - Calls: `GET /api/calls` (live and recent calls, newest first) and `GET /api/calls/{id}`,
//!   from the calls the hub remembers (while ringing and 15 minutes after; in cluster mode, the
//!   calls this node decides); the device detail lists the recent calls that rang the device.

pub(crate) mod calls;
pub(crate) mod listing;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, FromRequestParts, Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response, Sse, sse::Event, sse::KeepAlive},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use metrics_exporter_prometheus::PrometheusHandle;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tower_http::compression::CompressionLayer;

use calls::{CallView, DeviceCall, call_view, device_call};
use listing::{Changes, Counts, DevicePage, DeviceRow, ListQuery};

use super::{
    enrollment::{Caller, EnrollError, EnrollForm, Enroller},
    keys::{Holder, KeyError, Keys},
};
use crate::{
    auth::Scope,
    hub::{DeviceView, Hub, now_ms},
    listener::tls_incoming,
    metrics,
    observe::{DeliveryRecord, Diagnosis, SessionRecord, SiteHealth},
    store::StoreError,
};

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");
const COOKIE: &str = "lpush_session";
const NO_ENROLL_KEY: &str = "send `Authorization: Bearer <api key>` (scope enroll)";
const CSRF_HEADER: &str = "x-lpush-csrf";
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Remembered calls looked at for a listing (the hub keeps ended calls 15 minutes).
const CALLS_SCANNED: usize = 200;
/// Ended calls listed by `/api/calls`.
const RECENT_CALLS: usize = 50;
/// Calls listed in a device's history.
const DEVICE_CALLS: usize = 20;

/// What a dashboard user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// See everything.
    Read,
    /// See everything and revoke devices.
    Admin,
}

struct WebSession {
    /// The key's hash (never the key): the key is re-checked on every request.
    key_hash: String,
    expires: Instant,
}

/// Shared state of the dashboard.
pub(crate) struct Dashboard {
    hub: Hub,
    enroller: Enroller,
    keys: Arc<Keys>,
    node: String,
    metrics: PrometheusHandle,
    sessions: Mutex<HashMap<String, WebSession>>,
    shutdown: CancellationToken,
    streams: AtomicUsize,
}

#[derive(Serialize)]
struct Overview {
    node: String,
    /// Cluster mode: Redis and the nodes, as this node last saw them.
    cluster: Option<crate::hub::ClusterHealth>,
    now_ms: i64,
    /// Totals over every device (the rows come a page at a time from `/api/devices`).
    counts: Counts,
    sites: Vec<SiteHealth>,
    diagnoses: Vec<Diagnosis>,
    /// `[unix ms, devices online]`.
    series: Vec<(i64, u32)>,
    /// Recent delivery latencies, `[unix ms, kind, path, ms]`.
    latencies: Vec<(i64, &'static str, String, i64)>,
}

#[derive(Serialize)]
struct DeviceDetail {
    device: DeviceRow,
    sessions: Vec<SessionRecord>,
    deliveries: Vec<DeliveryRecord>,
    /// Recent calls that rang it, newest first: only those the hub still remembers (ringing,
    /// or ended within its memory window of 15 minutes).
    calls: Vec<DeviceCall>,
}

#[derive(Serialize)]
struct CallList {
    now_ms: i64,
    /// Still ringing (or a step still due), newest first.
    live: Vec<CallView>,
    /// Ended, newest first, at most [`RECENT_CALLS`].
    recent: Vec<CallView>,
}

#[derive(Deserialize)]
struct LoginForm {
    api_key: String,
}

#[derive(Serialize)]
struct Me {
    name: String,
    role: Role,
    node: String,
}

type Shared = Arc<Dashboard>;

impl Dashboard {
    /// The row of `v`; `online_by_ssid` says which sites are up (for its problem).
    fn row(&self, v: DeviceView, now: i64, online_by_ssid: &HashMap<String, usize>) -> DeviceRow {
        let mut o = self.hub.observer().device(&v.record.device_id, now);
        let node = self.node_of(&v).to_string();
        let r = v.record;
        // Enrolled before the previous CA rotation: it pins neither key the server presents.
        if r.ca_generation.saturating_add(1) < self.hub.ca_generation() {
            o.flags.push("needs_re-enrollment");
        }
        let site_up = listing::site_up(online_by_ssid, &r.last_ssid);
        DeviceRow {
            problem: listing::problem(&o.flags, v.online, r.revoked, site_up),
            online: v.online,
            revoked: r.revoked,
            ssid: r.last_ssid,
            node,
            session_started_ms: v.session_started_ms,
            last_seen_ms: r.last_seen_ms,
            last_heard_ms: if v.online { o.last_heard_ms } else { 0 },
            sdk_version: r.sdk_version,
            instance_id: o.instance_id,
            last_stop_reason: r.last_disconnect_reason,
            last_call_path: o.last_call_path,
            last_call_state: o.last_call_state,
            queued: v.queued,
            voip_token: match (r.voip_token.is_empty(), r.voip_token_invalid) {
                (true, _) => "none",
                (false, true) => "invalid",
                (false, false) => "registered",
            },
            heartbeat_misses: o.heartbeat_misses,
            instance_changes: o.instance_changes,
            ca_generation: r.ca_generation,
            flags: o.flags,
            last_provider_stop_reason: o.last_provider_stop_reason,
            left_wifi: o.left_wifi,
            groups: r.groups,
            device_id: r.device_id,
        }
    }

    /// The node shown for a device: cluster mode, the node holding it (none when offline).
    fn node_of<'a>(&'a self, v: &'a DeviceView) -> &'a str {
        match &v.node {
            Some(n) => n,
            None if self.hub.is_clustered() => "",
            None => &self.node,
        }
    }

    /// The page of the device table `query` asks for.
    async fn page(&self, query: &ListQuery, now: i64) -> Result<DevicePage, StoreError> {
        let (views, counts, online_by_ssid) = self.devices(now).await?;
        let (needle, mut buf) = (query.needle(), String::new());
        let rows = views
            .into_iter()
            .filter(|v| query.finds(&needle, v, self.node_of(v), &mut buf))
            .map(|v| self.row(v, now, &online_by_ssid))
            .collect();
        Ok(listing::page(rows, counts, query, now))
    }

    /// Every device, the totals over them, and the devices online per SSID.
    async fn devices(
        &self,
        now: i64,
    ) -> Result<(Vec<DeviceView>, Counts, HashMap<String, usize>), StoreError> {
        let views = self.hub.list_devices(None, false).await?;
        let online_by_ssid = listing::online_by_ssid(&views);
        let flagged = self.hub.observer().flagged_devices(now);
        let counts = Counts::of(&views, &flagged, &online_by_ssid);
        Ok((views, counts, online_by_ssid))
    }

    async fn device_row(&self, id: &str) -> Result<Option<DeviceRow>, StoreError> {
        let now = now_ms();
        let online_by_ssid = listing::online_by_ssid(&self.hub.list_devices(None, true).await?);
        Ok(self
            .hub
            .device_view(id)
            .await
            .map(|view| self.row(view, now, &online_by_ssid)))
    }

    /// The views of the calls the hub remembers, newest first, at most `max`.
    async fn calls(&self, max: usize) -> Result<Vec<CallView>, StoreError> {
        let records = self.hub.recent_calls(max);
        // Concurrently: each read waits for the store's writes so far, which the writer batches.
        let receipts =
            futures::future::try_join_all(records.iter().map(|c| self.hub.receipts(&c.call_id))).await?;
        Ok(records
            .iter()
            .zip(&receipts)
            .map(|(c, r)| call_view(c, r))
            .collect())
    }

    /// The caller, from the session cookie or a bearer API key, with its role and whether it
    /// came by cookie. A session whose key was revoked or expired is ended here.
    fn caller(&self, headers: &HeaderMap) -> Option<User> {
        if let Some(id) = cookie(headers) {
            let hash = {
                let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                sessions.retain(|_, s| s.expires > now);
                sessions.get(&id).map(|s| s.key_hash.clone())
            };
            if let Some(hash) = hash {
                match self.keys.by_hash(&hash).and_then(role_of) {
                    Ok((holder, role)) => return Some(User(holder, role, true)),
                    Err(_) => {
                        tracing::info!("dashboard session ended: its API key was revoked or expired");
                        self.sessions
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&id);
                    }
                }
            }
        }
        let (holder, role) = self.keys.caller(authorization(headers)).and_then(role_of).ok()?;
        Some(User(holder, role, false))
    }
}

/// A request's caller (session cookie or bearer key), with its role and whether it came by
/// cookie: a handler that takes one answers 401 to a request without.
struct User(Holder, Role, bool);

impl FromRequestParts<Shared> for User {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, d: &Shared) -> Result<Self, Response> {
        d.caller(&parts.headers).ok_or_else(unauthorized)
    }
}

/// The caller of a state-changing request: an admin, and with a cookie also the CSRF header.
struct Admin(Holder);

impl FromRequestParts<Shared> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, d: &Shared) -> Result<Self, Response> {
        let User(holder, role, by_cookie) = User::from_request_parts(parts, d).await?;
        if by_cookie && parts.headers.get(CSRF_HEADER).is_none_or(|v| v != "1") {
            return Err(error(StatusCode::FORBIDDEN, "missing the x-lpush-csrf header"));
        }
        if role != Role::Admin {
            return Err(error(StatusCode::FORBIDDEN, "this needs an admin API key"));
        }
        Ok(Admin(holder))
    }
}

/// The dashboard role an API key grants: it needs the read scope (which admin includes).
fn role_of(holder: Holder) -> Result<(Holder, Role), KeyError> {
    let holder = holder.require(Scope::Read)?;
    let role = if holder.grants(Scope::Admin) {
        Role::Admin
    } else {
        Role::Read
    };
    Ok((holder, role))
}

/// The request's `Authorization` value.
fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()
}

/// The session id in the request's cookie header, if any.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// A store failure, as answered.
fn unavailable(e: impl ToString) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
}

/// A handler's answer: the refusal is an answer too.
type Answer = Result<Response, Response>;

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "log in with an API key (scope read or admin)",
    )
}

/// Build the router.
pub(crate) fn router(dashboard: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
        .route("/app.css", get(style))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/overview", get(overview))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}", get(device))
        .route("/api/devices/{id}/revoke", post(revoke))
        .route("/api/calls", get(calls))
        .route("/api/calls/{id}", get(call))
        .route("/api/enrollments", get(enrollments))
        .route("/api/keys", get(list_keys))
        .route("/api/keys/{id}/revoke", post(revoke_key))
        .route("/api/events", get(events))
        .route("/v1/enroll", post(enroll))
        .layer(axum::middleware::map_response(security_headers))
        // gzip for clients that accept it (JSON shrinks ~10x); never the event stream.
        .layer(CompressionLayer::new())
        .with_state(dashboard)
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX)
}

async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT)
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

async fn metrics_text(State(d): State<Shared>, _: User) -> Answer {
    let views = d.hub.list_devices(None, false).await.map_err(unavailable)?;
    let (churn, hb, sites) = d.hub.observer().flagged(now_ms());
    let snapshot = metrics::Snapshot {
        sessions_online: views.iter().filter(|v| v.online).count(),
        devices: views.len(),
        queued: views.iter().map(|v| v.queued).sum(),
        queued_max: views.iter().map(|v| v.queued).max().unwrap_or(0),
        churn_flagged: churn,
        heartbeat_flagged: hb,
        sites_flagged: sites,
        streams: d.streams.load(Ordering::Relaxed),
    };
    let text = metrics::render(&d.metrics, &snapshot);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response())
}

async fn login(State(d): State<Shared>, Json(form): Json<LoginForm>) -> Response {
    let holder = match d.keys.authenticate(&form.api_key) {
        Ok(holder) => holder,
        Err(e) => {
            tracing::warn!(reason = %e, "dashboard login refused");
            return error(StatusCode::UNAUTHORIZED, &e.to_string());
        }
    };
    let Ok((holder, role)) = role_of(holder) else {
        tracing::warn!("dashboard login refused: neither read nor admin scope");
        return error(
            StatusCode::UNAUTHORIZED,
            "this API key has neither the read nor the admin scope",
        );
    };
    let name = holder.name().to_string();
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let id = URL_SAFE_NO_PAD.encode(raw);
    tracing::info!(api_key = %name, key_id = %holder.id, ?role, "dashboard login");
    d.sessions.lock().unwrap_or_else(PoisonError::into_inner).insert(
        id.clone(),
        WebSession {
            key_hash: holder.hash().to_string(),
            expires: Instant::now() + SESSION_TTL,
        },
    );
    let set = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    (
        [(header::SET_COOKIE, set)],
        Json(Me {
            name,
            role,
            node: d.node.clone(),
        }),
    )
        .into_response()
}

async fn logout(State(d): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers) {
        d.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, clear)], StatusCode::NO_CONTENT).into_response()
}

async fn me(State(d): State<Shared>, User(holder, role, _): User) -> Json<Me> {
    Json(Me {
        name: holder.name().to_string(),
        role,
        node: d.node.clone(),
    })
}

/// For load balancers and supervisors, without a key: 200 when this node can serve, 503 when a
/// cluster node has lost Redis (its sessions go on, but sends and logins that need Redis fail).
async fn healthz(State(d): State<Shared>) -> Response {
    match d.hub.cluster_health() {
        None => Json(serde_json::json!({"status": "ok", "mode": "embedded", "node": d.node})).into_response(),
        Some(h) => {
            let (code, status) = if h.redis_up {
                (StatusCode::OK, "ok")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "degraded")
            };
            let body = serde_json::json!({"status": status, "mode": "cluster", "node": d.node, "cluster": h});
            (code, Json(body)).into_response()
        }
    }
}

async fn overview(State(d): State<Shared>, _: User) -> Answer {
    let now = now_ms();
    let (_, counts, online_by_ssid) = d.devices(now).await.map_err(unavailable)?;
    let observer = d.hub.observer();
    Ok(Json(Overview {
        node: d.node.clone(),
        cluster: d.hub.cluster_health(),
        now_ms: now,
        counts,
        sites: observer.sites(&online_by_ssid, now),
        diagnoses: observer.diagnoses(),
        series: observer.series(),
        latencies: observer.latencies(),
    })
    .into_response())
}

/// One page of the device table: `?q=&state=&ssid=&sort=&desc=&offset=&limit=` (see
/// [`ListQuery`]).
async fn devices(
    State(d): State<Shared>,
    _: User,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let bad = |e: &str| error(StatusCode::BAD_REQUEST, e);
    let Query(query) = query.map_err(|e| bad(&e.body_text()))?;
    query.validate().map_err(|e| bad(&e))?;
    Ok(Json(d.page(&query, now_ms()).await.map_err(unavailable)?).into_response())
}

async fn device(State(d): State<Shared>, _: User, Path(id): Path<String>) -> Answer {
    let row = d.device_row(&id).await.map_err(unavailable)?;
    let row = row.ok_or_else(|| error(StatusCode::NOT_FOUND, "no such device"))?;
    let (sessions, deliveries) = d.hub.observer().history(&id);
    let calls = d.calls(CALLS_SCANNED).await.map_err(unavailable)?;
    let calls = calls
        .iter()
        .filter_map(|c| device_call(c, &id))
        .take(DEVICE_CALLS)
        .collect();
    Ok(Json(DeviceDetail {
        device: row,
        sessions,
        deliveries,
        calls,
    })
    .into_response())
}

async fn calls(State(d): State<Shared>, _: User) -> Answer {
    let all = d.calls(CALLS_SCANNED).await.map_err(unavailable)?;
    let (live, mut recent): (Vec<_>, Vec<_>) = all.into_iter().partition(|c| c.ended_at_ms.is_none());
    recent.truncate(RECENT_CALLS);
    Ok(Json(CallList {
        now_ms: now_ms(),
        live,
        recent,
    })
    .into_response())
}

async fn call(State(d): State<Shared>, _: User, Path(id): Path<String>) -> Answer {
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "no such call is ringing or remembered here",
        )
    };
    let record = d.hub.call_record(&id).ok_or_else(not_found)?;
    let receipts = d.hub.receipts(&id).await.map_err(unavailable)?;
    Ok(Json(call_view(&record, &receipts)).into_response())
}

async fn revoke(State(d): State<Shared>, Admin(admin): Admin, Path(id): Path<String>) -> Response {
    match d.hub.revoke_device(&id).await {
        Ok(Some(closed)) => {
            tracing::info!(api_key = %admin, device = %id, session_closed = closed, "device revoked from the dashboard");
            Json(serde_json::json!({ "session_closed": closed })).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no such device"),
        Err(e) => unavailable(e),
    }
}

async fn enrollments(State(d): State<Shared>, _: User) -> Response {
    Json(serde_json::json!({ "enrollments": d.enroller.recent() })).into_response()
}

async fn list_keys(State(d): State<Shared>, User(_, role, _): User) -> Response {
    match role {
        Role::Read => error(StatusCode::FORBIDDEN, "listing keys needs an admin API key"),
        Role::Admin => match d.keys.list() {
            Ok(keys) => Json(serde_json::json!({ "keys": keys })).into_response(),
            Err(e) => unavailable(e),
        },
    }
}

async fn revoke_key(State(d): State<Shared>, Admin(admin): Admin, Path(id): Path<String>) -> Response {
    match d.keys.revoke(&id).await {
        Ok(key) => {
            tracing::info!(api_key = %admin, name = %key.name, key_id = %key.id, "API key revoked from the dashboard");
            Json(key).into_response()
        }
        Err(KeyError::Unknown) => error(StatusCode::NOT_FOUND, "no API key with that id"),
        Err(e @ KeyError::Invalid(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ KeyError::Refused(_)) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => unavailable(e),
    }
}

async fn enroll(
    State(d): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
    Json(form): Json<EnrollForm>,
) -> Response {
    let holder = match d.keys.caller(authorization(&headers)) {
        Ok(holder) => holder,
        Err(KeyError::Missing) => return error(StatusCode::UNAUTHORIZED, NO_ENROLL_KEY),
        Err(e @ KeyError::Store(_)) => return unavailable(e),
        Err(e) => return error(StatusCode::UNAUTHORIZED, &e.to_string()),
    };
    let req = push_proto::sender::EnrollDeviceRequest::from(form);
    let caller = Caller {
        key: &holder,
        source: Some(peer),
        via: "https",
    };
    match d.enroller.enroll(req, caller).await {
        Ok(enrollment) => ([(header::CONTENT_TYPE, "application/x-plist")], enrollment.plist).into_response(),
        Err(e @ EnrollError::InvalidName(..)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ EnrollError::AlreadyEnrolled(_)) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ EnrollError::NotAllowed(_)) => error(StatusCode::FORBIDDEN, &e.to_string()),
        Err(e @ EnrollError::RateLimited(_)) => error(StatusCode::TOO_MANY_REQUESTS, &e.to_string()),
        Err(EnrollError::Store(e)) => unavailable(e),
    }
}

/// Counts open streams for the gauge.
struct StreamGuard(Shared);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How often the live stream tells the page what changed: the events of a burst (a ward's
/// receipts, a thousand phones connecting) reach the page as a few small `changed` events.
const CHANGES_EVERY: Duration = Duration::from_millis(250);

async fn events(State(d): State<Shared>, User(holder, ..): User) -> Response {
    let mut presence = d.hub.subscribe_presence();
    let mut receipts = d.hub.subscribe_receipts();
    let mut diagnoses = d.hub.observer().subscribe_diagnoses();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(256);
    d.streams.fetch_add(1, Ordering::Relaxed);
    let guard = StreamGuard(d.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let d = _guard.0.clone();
        let _ = tx
            .send(Ok(Event::default().event("hello").data(d.node.clone())))
            .await;
        let mut changes = Changes::default();
        let mut flush = tokio::time::interval(CHANGES_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = d.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                // The key was revoked or expired: say so and end the stream (the page then finds
                // its session gone).
                end = holder.ended() => {
                    let _ = tx.send(Ok(Event::default().event("logout").data(end.to_string()))).await;
                    return;
                }
                _ = flush.tick() => {
                    if let Some(e) = changes.take().and_then(|c| Event::default().event("changed").json_data(c).ok())
                        && tx.send(Ok(e)).await.is_err()
                    {
                        return;
                    }
                }
                p = presence.recv() => match p {
                    Ok(p) => changes.device(&p.device_id),
                    Err(broadcast::error::RecvError::Lagged(_)) => changes.everything(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                r = receipts.recv() => match r {
                    Ok(r) => changes.device(&r.device_id),
                    Err(broadcast::error::RecvError::Lagged(_)) => changes.everything(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                x = diagnoses.recv() => match x {
                    Ok(_) => changes.overview(),
                    Err(broadcast::error::RecvError::Lagged(_)) => changes.everything(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The peer address of a connection from [`TlsIncoming`] (axum provides connect info only for
/// its own listeners).
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsIncoming>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsIncoming>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Hands TLS connections accepted by our own loop to axum.
struct TlsIncoming {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended (shutdown): wait for the graceful-shutdown signal.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Serve the dashboard and `/metrics` on `listener` until `shutdown`.
pub(crate) fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    enroller: Enroller,
    keys: Arc<Keys>,
    node: String,
    shutdown: CancellationToken,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let addr = listener.local_addr()?;
    let dashboard = Arc::new(Dashboard {
        hub: hub.clone(),
        enroller,
        keys,
        node,
        metrics: metrics::install(),
        sessions: Mutex::new(HashMap::new()),
        shutdown: shutdown.clone(),
        streams: AtomicUsize::new(0),
    });
    let rx = tls_incoming(
        listener,
        acceptor,
        hub.limits().clone(),
        shutdown.clone(),
        crate::admission::Listener::Dashboard,
    );
    let app = router(dashboard);
    Ok(async move {
        let incoming = TlsIncoming { rx, addr };
        // Connect info: `POST /v1/enroll` records the peer's address.
        let app = app.into_make_service_with_connect_info::<Peer>();
        if let Err(e) = axum::serve(incoming, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "dashboard server failed");
        }
    })
}
