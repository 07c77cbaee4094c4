//! The sender and admin gRPC API (tonic). The only module that knows tonic; it translates
//! requests into hub calls and hub outcomes into statuses, and checks every caller's API key.

use std::{collections::HashMap, pin::Pin, sync::Arc};

use futures::Stream;
use push_proto::{
    device::CancelReason,
    sender::{
        CancelCallRequest, CancelCallResponse, CreateApiKeyRequest, CreateApiKeyResponse, DeliveryState,
        DeliveryUpdate, DeviceInfo, EnrollDeviceRequest, Enrollment, GetMessageStatusRequest,
        IssueDeviceCredentialRequest, IssueDeviceCredentialResponse, ListDevicesRequest, ListDevicesResponse,
        MessageStatus, PlaceCallRequest, PlaceCallResponse, PresenceEvent, Recipient, RevokeDeviceRequest,
        RevokeDeviceResponse, SendMessageRequest, SendMessageResponse, SetVoipTokenRequest,
        SetVoipTokenResponse, Target, VoipTokenState, WatchCallRequest, WatchPresenceRequest,
        push_admin_server, push_sender_server, target,
    },
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    admission::KeyedRate,
    auth::{Scope, api_key_hash, bearer_token, new_api_key},
    enrollment::{Caller, EnrollError, Enroller, check_name},
    hub::{CallRequest, Hub, MessageRequest, SendError, now_ms},
    observe::metrics,
    store::{ApiKeyRecord, Op, Receipt, ReceiptState},
};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Shared by both services.
#[derive(Clone)]
pub struct Api {
    hub: Hub,
    enroller: Enroller,
    shutdown: CancellationToken,
    keys: Arc<KeyCache>,
    /// Requests per API key, by key (like `keys`: in memory only, never logged).
    rate: Arc<KeyedRate<String>>,
}

/// API keys verified recently, by key, so that a busy sender does not cost a store read and a
/// SHA-256 on every request. An entry is trusted for [`KEY_CACHE_TTL`] only, so a key changed
/// in the store is seen within that time; only known keys are cached, at most [`KEY_CACHE_MAX`].
#[derive(Default)]
struct KeyCache(std::sync::Mutex<HashMap<String, (ApiKeyRecord, std::time::Instant)>>);

const KEY_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
const KEY_CACHE_MAX: usize = 256;

impl KeyCache {
    fn get(&self, key: &str) -> Option<ApiKeyRecord> {
        let keys = self.0.lock().expect("poisoned");
        keys.get(key)
            .filter(|(_, at)| at.elapsed() < KEY_CACHE_TTL)
            .map(|(record, _)| record.clone())
    }

    fn put(&self, key: &str, record: &ApiKeyRecord) {
        let mut keys = self.0.lock().expect("poisoned");
        if keys.len() >= KEY_CACHE_MAX {
            keys.clear();
        }
        keys.insert(key.to_owned(), (record.clone(), std::time::Instant::now()));
    }
}

impl Api {
    /// Services over `hub`; watch streams end at `shutdown`.
    pub fn new(hub: Hub, enroller: Enroller, shutdown: CancellationToken) -> Self {
        let limits = hub.limits();
        let rate = KeyedRate::new(
            std::time::Duration::from_secs(1),
            limits.api_requests_per_sec_per_key,
            limits.api_request_burst_per_key,
        );
        Self {
            hub,
            enroller,
            shutdown,
            keys: Arc::default(),
            rate: Arc::new(rate),
        }
    }

    /// The sender service.
    pub fn sender(&self) -> push_sender_server::PushSenderServer<Api> {
        push_sender_server::PushSenderServer::new(self.clone())
    }

    /// The admin service.
    pub fn admin(&self) -> push_admin_server::PushAdminServer<Api> {
        push_admin_server::PushAdminServer::new(self.clone())
    }

    /// Check the caller's API key for `scope`; returns the key's name for logs.
    fn authorize<T>(&self, req: &Request<T>, scope: Scope) -> Result<String, Status> {
        let record = self.caller(req)?;
        if !scope.granted_by(&record.scopes) {
            return Err(Status::permission_denied(format!(
                "API key {:?} lacks the {scope:?} scope",
                record.name
            )));
        }
        Ok(record.name)
    }

    /// The caller's API key record.
    fn caller<T>(&self, req: &Request<T>) -> Result<ApiKeyRecord, Status> {
        let key = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <api key>`"))?;
        if let Some(record) = self.keys.get(key) {
            return self.within_rate(key, record);
        }
        let record = self
            .hub
            .store()
            .api_key(&api_key_hash(key))
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::unauthenticated("unknown API key"))?;
        self.keys.put(key, &record);
        self.within_rate(key, record)
    }

    /// Take one request from the key's rate (`limits.api_requests_per_sec_per_key`): a sender
    /// in a retry loop must not take the hub from the others. Only known keys get here, so the
    /// limiter holds at most one entry per key.
    fn within_rate(&self, key: &str, record: ApiKeyRecord) -> Result<ApiKeyRecord, Status> {
        if self.rate.check(&key.to_owned()) {
            return Ok(record);
        }
        metrics::api_rate_limited();
        tracing::debug!(api_key = %record.name, "request refused: over limits.api_requests_per_sec_per_key");
        Err(Status::resource_exhausted(format!(
            "API key {:?} is over its request rate; retry with backoff",
            record.name
        )))
    }

    /// Stream the current receipts of `id`, then changes, until every recipient is final.
    async fn watch(&self, id: String) -> Result<BoxStream<DeliveryUpdate>, Status> {
        let mut changes = self.hub.subscribe_receipts();
        let current = self.hub.receipts(&id).await.map_err(store_status)?;
        if current.is_empty() {
            return Err(Status::not_found(format!("no message or call {id:?}")));
        }
        let (tx, rx) = mpsc::channel(64);
        let (hub, shutdown) = (self.hub.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let mut states: HashMap<String, ReceiptState> = HashMap::new();
            let mut pending = current;
            loop {
                for r in pending.drain(..) {
                    // Receipts can race the initial read; never report a state going backwards.
                    if states.get(&r.device_id).is_some_and(|s| s.is_final()) {
                        continue;
                    }
                    states.insert(r.device_id.clone(), r.state);
                    if tx.send(Ok(update(r))).await.is_err() {
                        return;
                    }
                }
                if states.values().all(|s| s.is_final()) {
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = changes.recv() => match r {
                        Ok(r) if r.id == id => pending.push(r),
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => match hub.receipts(&id).await {
                            Ok(all) => pending = all,
                            Err(e) => { let _ = tx.send(Err(store_status(e))).await; return; }
                        },
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl push_sender_server::PushSender for Api {
    async fn send_message(
        &self,
        req: Request<SendMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        let sender = self.authorize(&req, Scope::Send)?;
        let r = req.into_inner();
        let (device_ids, group) = targets(r.target)?;
        // Forwarded to phones as is: only values the device protocol defines.
        if push_proto::device::Priority::try_from(r.priority).is_err() {
            return Err(Status::invalid_argument(format!(
                "priority {} is not a Priority (0 unspecified, 1 normal, 2 high)",
                r.priority
            )));
        }
        let sent = self
            .hub
            .send_message(MessageRequest {
                id: r.message_id,
                device_ids,
                group,
                title: r.title,
                body: r.body,
                data: r.data,
                priority: r.priority,
                ttl_secs: r.ttl_seconds,
                collapse_key: r.collapse_key,
                sender: if r.sender.is_empty() {
                    sender.clone()
                } else {
                    r.sender
                },
            })
            .await
            .map_err(send_status)?;
        tracing::info!(api_key = %sender, message_id = %sent.id, recipients = sent.recipients.len(), "message accepted");
        Ok(Response::new(SendMessageResponse {
            message_id: sent.id,
            recipients: sent.recipients.into_iter().map(recipient).collect(),
            expires_at_ms: sent.expires_at_ms,
        }))
    }

    async fn get_message_status(
        &self,
        req: Request<GetMessageStatusRequest>,
    ) -> Result<Response<MessageStatus>, Status> {
        self.authorize(&req, Scope::Read)?;
        let id = req.into_inner().message_id;
        let receipts = self.hub.receipts(&id).await.map_err(store_status)?;
        if receipts.is_empty() {
            return Err(Status::not_found(format!("no message {id:?}")));
        }
        Ok(Response::new(MessageStatus {
            message_id: id,
            recipients: receipts.into_iter().map(update).collect(),
        }))
    }

    type WatchMessageStream = BoxStream<DeliveryUpdate>;

    async fn watch_message(
        &self,
        req: Request<GetMessageStatusRequest>,
    ) -> Result<Response<Self::WatchMessageStream>, Status> {
        self.authorize(&req, Scope::Read)?;
        Ok(Response::new(self.watch(req.into_inner().message_id).await?))
    }

    async fn place_call(
        &self,
        req: Request<PlaceCallRequest>,
    ) -> Result<Response<PlaceCallResponse>, Status> {
        let caller = self.authorize(&req, Scope::Call)?;
        let r = req.into_inner();
        let (device_ids, group) = targets(r.target)?;
        let (sent, call_uuid) = self
            .hub
            .place_call(CallRequest {
                call_id: r.call_id,
                device_ids,
                group,
                caller_name: r.caller_name,
                caller_handle: r.caller_handle,
                video: r.video,
                ring_secs: r.ring_timeout_seconds,
            })
            .await
            .map_err(send_status)?;
        tracing::info!(api_key = %caller, call_id = %sent.id, callees = sent.recipients.len(), "call placed");
        Ok(Response::new(PlaceCallResponse {
            call_id: sent.id,
            call_uuid,
            ring_deadline_ms: sent.expires_at_ms,
            recipients: sent.recipients.into_iter().map(recipient).collect(),
        }))
    }

    async fn cancel_call(
        &self,
        req: Request<CancelCallRequest>,
    ) -> Result<Response<CancelCallResponse>, Status> {
        self.authorize(&req, Scope::Call)?;
        let r = req.into_inner();
        let reason = CancelReason::try_from(r.reason).unwrap_or(CancelReason::CallerCancelled);
        let cancels_sent = self
            .hub
            .cancel_call(&r.call_id, reason)
            .await
            .map_err(send_status)?;
        Ok(Response::new(CancelCallResponse { cancels_sent }))
    }

    type WatchCallStream = BoxStream<DeliveryUpdate>;

    async fn watch_call(
        &self,
        req: Request<WatchCallRequest>,
    ) -> Result<Response<Self::WatchCallStream>, Status> {
        self.authorize(&req, Scope::Read)?;
        Ok(Response::new(self.watch(req.into_inner().call_id).await?))
    }

    async fn list_devices(
        &self,
        req: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        self.authorize(&req, Scope::Read)?;
        let r = req.into_inner();
        let group = (!r.group.is_empty()).then_some(r.group.as_str());
        let now = now_ms();
        let devices = self
            .hub
            .list_devices(group, r.online_only)
            .into_iter()
            .map(|v| DeviceInfo {
                device_id: v.record.device_id,
                groups: v.record.groups,
                online: v.online,
                last_seen_ms: if v.online { now } else { v.record.last_seen_ms },
                ssid: v.record.last_ssid,
                session_age_seconds: v
                    .session_started_ms
                    .map_or(0, |t| ((now - t).max(0) / 1000) as u64),
                sdk_version: v.record.sdk_version,
                last_disconnect_reason: v.record.last_disconnect_reason,
                queued: v.queued as u32,
                revoked: v.record.revoked,
                voip_token: if v.record.voip_token.is_empty() {
                    VoipTokenState::None
                } else if v.record.voip_token_invalid {
                    VoipTokenState::Invalid
                } else {
                    VoipTokenState::Registered
                } as i32,
            })
            .collect();
        Ok(Response::new(ListDevicesResponse { devices }))
    }

    type WatchPresenceStream = BoxStream<PresenceEvent>;

    async fn watch_presence(
        &self,
        req: Request<WatchPresenceRequest>,
    ) -> Result<Response<Self::WatchPresenceStream>, Status> {
        self.authorize(&req, Scope::Read)?;
        let mut events = self.hub.subscribe_presence();
        let (tx, rx) = mpsc::channel(256);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = events.recv() => e,
                };
                match event {
                    Ok(e) => {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "{n} presence events were dropped; re-list devices"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl push_admin_server::PushAdmin for Api {
    async fn issue_device_credential(
        &self,
        req: Request<IssueDeviceCredentialRequest>,
    ) -> Result<Response<IssueDeviceCredentialResponse>, Status> {
        let admin = self.authorize(&req, Scope::Admin)?;
        let r = req.into_inner();
        let credential = self
            .enroller
            .issue_credential(&r.device_id, r.groups, r.valid_days)
            .await
            .map_err(enroll_status)?;
        tracing::info!(api_key = %admin, device = %r.device_id, "device credential issued");
        Ok(Response::new(IssueDeviceCredentialResponse {
            device_id: r.device_id,
            credential: credential.token,
            expires_at_ms: credential.expires_at_ms,
        }))
    }

    async fn enroll_device(&self, req: Request<EnrollDeviceRequest>) -> Result<Response<Enrollment>, Status> {
        let record = self.caller(&req)?;
        let caller = if Scope::Admin.granted_by(&record.scopes) {
            Caller::Admin
        } else if Scope::Enroll.granted_by(&record.scopes) {
            Caller::App
        } else {
            return Err(Status::permission_denied(format!(
                "API key {:?} lacks the enroll scope",
                record.name
            )));
        };
        let enrollment = self
            .enroller
            .enroll(req.into_inner(), caller)
            .await
            .map_err(enroll_status)?;
        tracing::info!(api_key = %record.name, device = %enrollment.device_id, "device enrolled");
        Ok(Response::new(enrollment))
    }

    async fn revoke_device(
        &self,
        req: Request<RevokeDeviceRequest>,
    ) -> Result<Response<RevokeDeviceResponse>, Status> {
        let admin = self.authorize(&req, Scope::Admin)?;
        let id = req.into_inner().device_id;
        let closed = self
            .hub
            .revoke_device(&id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no device {id:?}")))?;
        tracing::info!(api_key = %admin, device = %id, session_closed = closed, "device revoked");
        Ok(Response::new(RevokeDeviceResponse {
            session_closed: closed,
        }))
    }

    async fn set_voip_token(
        &self,
        req: Request<SetVoipTokenRequest>,
    ) -> Result<Response<SetVoipTokenResponse>, Status> {
        let admin = self.authorize(&req, Scope::Admin)?;
        let r = req.into_inner();
        let token = if r.token.is_empty() {
            None
        } else {
            Some(
                apns_bridge::DeviceToken::parse(&r.token)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            )
        };
        let registered = token.is_some();
        self.hub
            .set_voip_token(&r.device_id, token)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no device {:?}", r.device_id)))?;
        tracing::info!(api_key = %admin, device = %r.device_id, registered, "VoIP token set");
        Ok(Response::new(SetVoipTokenResponse {}))
    }

    async fn create_api_key(
        &self,
        req: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let admin = self.authorize(&req, Scope::Admin)?;
        let r = req.into_inner();
        check_name("name", &r.name).map_err(enroll_status)?;
        if r.scopes.is_empty() {
            return Err(Status::invalid_argument("at least one scope is required"));
        }
        if let Some(bad) = r.scopes.iter().find(|s| Scope::parse(s).is_none()) {
            return Err(Status::invalid_argument(format!(
                "unknown scope {bad:?}; use send, call, read, enroll or admin"
            )));
        }
        let key = create_api_key(&self.hub, &r.name, r.scopes)
            .await
            .map_err(store_status)?;
        tracing::info!(api_key = %admin, name = %r.name, "API key created");
        Ok(Response::new(CreateApiKeyResponse {
            name: r.name,
            api_key: key,
        }))
    }
}

/// Create and store a new API key; returns the key (the store keeps only its hash).
pub async fn create_api_key(
    hub: &Hub,
    name: &str,
    scopes: Vec<String>,
) -> Result<String, crate::store::StoreError> {
    let key = new_api_key();
    let record = ApiKeyRecord {
        name: name.into(),
        scopes,
        created_at_ms: now_ms(),
    };
    crate::store::commit(
        &**hub.store(),
        vec![Op::PutApiKey {
            hash: api_key_hash(&key),
            record,
        }],
    )
    .await?;
    Ok(key)
}

/// The devices or group a send names. Ids and group names follow the rule of enrollment (1-128
/// bytes, no control characters), so a sender cannot make receipts, logs or the store carry
/// kilobytes per recipient.
fn targets(target: Option<Target>) -> Result<(Vec<String>, Option<String>), Status> {
    let (ids, group) = match target.and_then(|t| t.kind) {
        Some(target::Kind::DeviceId(id)) => (vec![id], None),
        Some(target::Kind::Devices(list)) => (list.device_ids, None),
        Some(target::Kind::Group(g)) => (Vec::new(), Some(g)),
        None => {
            return Err(Status::invalid_argument(
                "target is required (device_id, devices or group)",
            ));
        }
    };
    for id in &ids {
        check_name("device_id", id).map_err(enroll_status)?;
    }
    if let Some(g) = &group {
        check_name("group", g).map_err(enroll_status)?;
    }
    Ok((ids, group))
}

/// Tonic answers a request over its message size limit with OUT_OF_RANGE, which clients treat
/// as a bad argument value; gRPC's convention (and every other gRPC server) says
/// RESOURCE_EXHAUSTED. Such an answer is trailers-only (the status is in the headers), since
/// the request was refused before the handler ran, so only those headers need rewriting.
pub fn oversized_is_resource_exhausted<B>(mut res: http::Response<B>) -> http::Response<B> {
    let headers = res.headers_mut();
    let oversized = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("decoded") && m.contains("too") && m.contains("large"));
    if oversized {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from(tonic::Code::ResourceExhausted as i32),
        );
    }
    res
}

fn state(s: ReceiptState) -> DeliveryState {
    match s {
        ReceiptState::Accepted => DeliveryState::Accepted,
        ReceiptState::Delivered => DeliveryState::Delivered,
        ReceiptState::Acked => DeliveryState::Acked,
        ReceiptState::Expired => DeliveryState::Expired,
        ReceiptState::Undeliverable => DeliveryState::Undeliverable,
        ReceiptState::Superseded => DeliveryState::Superseded,
        ReceiptState::Cancelled => DeliveryState::Cancelled,
    }
}

fn update(r: Receipt) -> DeliveryUpdate {
    DeliveryUpdate {
        id: r.id,
        device_id: r.device_id,
        state: state(r.state) as i32,
        reason: r.reason,
        at_ms: r.at_ms,
        path: r.path,
    }
}

fn recipient(r: crate::hub::RecipientOutcome) -> Recipient {
    Recipient {
        device_id: r.device_id,
        state: state(r.state) as i32,
        reason: r.reason,
    }
}

fn send_status(e: SendError) -> Status {
    match e {
        SendError::Invalid(m) => Status::invalid_argument(m),
        SendError::CallExists(_) | SendError::IdInUse { .. } => Status::already_exists(e.to_string()),
        SendError::UnknownCall(_) => Status::not_found(e.to_string()),
        SendError::Store(e) => store_status(e),
    }
}

fn enroll_status(e: EnrollError) -> Status {
    match e {
        EnrollError::InvalidName(_) => Status::invalid_argument(e.to_string()),
        EnrollError::AlreadyEnrolled(_) => Status::already_exists(e.to_string()),
        EnrollError::Store(e) => store_status(e),
    }
}

fn store_status(e: crate::store::StoreError) -> Status {
    tracing::error!(error = %e, "store failure");
    Status::unavailable(format!("storage unavailable: {e}"))
}
