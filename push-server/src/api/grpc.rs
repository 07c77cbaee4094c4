//! The sender and admin gRPC API (tonic), served over TLS 1.3 with health and reflection. The
//! only module that knows tonic; it translates requests into hub calls and hub outcomes into
//! statuses, and checks every caller's API key.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, pin::Pin, sync::Arc};

use futures::Stream;
use push_proto::{
    device::CancelReason,
    sender::{
        ApiKeyInfo, ApiKeyState, BackupChunk, BackupRequest, CallState, CallStatus, CallStep,
        CancelCallRequest, CancelCallResponse, CreateApiKeyRequest, CreateApiKeyResponse, DeliveryState,
        DeliveryUpdate, DeviceInfo, EnrollDeviceRequest, Enrollment, GetMessageStatusRequest,
        IssueDeviceCredentialRequest, IssueDeviceCredentialResponse, ListApiKeysRequest, ListApiKeysResponse,
        ListDevicesRequest, ListDevicesResponse, MessageStatus, PlaceCallRequest, PlaceCallResponse,
        PresenceEvent, Recipient, RevokeApiKeyRequest, RevokeApiKeyResponse, RevokeDeviceRequest,
        RevokeDeviceResponse, RotateCaRequest, RotateCaResponse, SendMessageRequest, SendMessageResponse,
        SetVoipTokenRequest, SetVoipTokenResponse, Target, VoipTokenState, WatchCallRequest,
        WatchPresenceRequest, push_admin_server, push_sender_server, target,
    },
};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc},
};
use tokio_rustls::TlsAcceptor;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{
    enrollment::{Caller, EnrollError, Enroller, check_name},
    keys::{Holder, KeyError, KeyState, KeySummary, Keys, NewKey},
};
use crate::{
    admission::{KeyedRate, Listener},
    auth::Scope,
    config::Limits,
    hub::{CallRequest, EscalationStep, Heard, Hub, MessageRequest, SendError, now_ms},
    listener::tls_incoming,
    metrics, pki,
    store::{CallEnd, CallRecord, PushKind, Receipt, ReceiptState, Store},
};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Shared by both services.
#[derive(Clone)]
pub(crate) struct Api {
    hub: Hub,
    enroller: Enroller,
    shutdown: CancellationToken,
    keys: Arc<Keys>,
    /// Requests per API key, by the key's hash (in memory only, never logged).
    rate: Arc<KeyedRate<String>>,
    /// The data directory and the store, for backups.
    data_dir: PathBuf,
    store: Arc<dyn Store>,
    /// CA rotations of this server.
    rotator: Arc<crate::pki::Rotator>,
}

impl Api {
    /// Services over `hub`, and the server's `store` and `data_dir` for backups, authenticating
    /// with `keys`; watch streams end at `shutdown` (and when their key is revoked or expires).
    pub(crate) fn new(
        hub: Hub,
        enroller: Enroller,
        keys: Arc<Keys>,
        store: Arc<dyn Store>,
        data_dir: PathBuf,
        rotator: Arc<crate::pki::Rotator>,
        shutdown: CancellationToken,
    ) -> Self {
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
            keys,
            rate: Arc::new(rate),
            data_dir,
            store,
            rotator,
        }
    }

    /// The sender service.
    pub(crate) fn sender(&self) -> push_sender_server::PushSenderServer<Api> {
        push_sender_server::PushSenderServer::new(self.clone())
    }

    /// The admin service.
    pub(crate) fn admin(&self) -> push_admin_server::PushAdminServer<Api> {
        push_admin_server::PushAdminServer::new(self.clone())
    }

    /// Check the caller's API key for `scope`.
    fn authorize<T>(&self, req: &Request<T>, scope: Scope) -> Result<Holder, Status> {
        self.caller(req)?.require(scope).map_err(key_status)
    }

    /// The caller's API key: known, not revoked, not expired, within its rate.
    fn caller<T>(&self, req: &Request<T>) -> Result<Holder, Status> {
        let authorization = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        self.within_rate(self.keys.caller(authorization).map_err(key_status)?)
    }

    /// Take one request from the key's rate (`limits.api_requests_per_sec_per_key`): a sender
    /// in a retry loop must not take the hub from the others. Only known keys get here, so the
    /// limiter holds at most one entry per key.
    fn within_rate(&self, holder: Holder) -> Result<Holder, Status> {
        if self.rate.check(&holder.hash().to_owned()) {
            return Ok(holder);
        }
        metrics::api_rate_limited();
        tracing::debug!(api_key = %holder.name(), "request refused: over limits.api_requests_per_sec_per_key");
        Err(Status::resource_exhausted(format!(
            "API key {:?} is over its request rate; retry with backoff",
            holder.name()
        )))
    }

    /// Follow the receipts of message or call `id`: the current ones, then changes, until every
    /// recipient is final (`call`: a call, whose updates name the step that rang each callee
    /// and whose stream lasts until the call ended), the caller's key ends or the caller goes.
    async fn watch(&self, id: String, key: Holder, call: bool) -> Result<BoxStream<DeliveryUpdate>, Status> {
        let mut changes = self
            .hub
            .watch_receipts(&id)
            .map_err(|e| Status::resource_exhausted(format!("cannot watch {id:?}: {e}; retry later")))?;
        let current = current_receipts(&self.hub, &id, call)
            .await
            .map_err(store_status)?;
        if current.is_empty() {
            return Err(Status::not_found(format!("no message or call {id:?}")));
        }
        let (tx, rx) = mpsc::channel(64);
        let (hub, shutdown) = (self.hub.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            // The last update reported per device.
            let mut states: HashMap<String, Receipt> = HashMap::new();
            let mut pending = current;
            loop {
                let mut fresh = Vec::with_capacity(pending.len());
                for r in pending.drain(..) {
                    // Receipts can race the initial read, and a re-read after a lag repeats what
                    // was reported: never report a state going backwards, or the same twice.
                    if states.get(&r.device_id).is_some_and(|last| !advances(last, &r)) {
                        continue;
                    }
                    states.insert(r.device_id.clone(), r.clone());
                    fresh.push(r);
                }
                // A call is read once per batch (from Redis, in a cluster), after its receipts:
                // it knows every callee they name, and whether it ended.
                let record = match call {
                    true => hub.find_call(&id).await.ok().flatten(),
                    false => None,
                };
                for r in fresh {
                    let mut u = update(r);
                    u.step = record.as_ref().map_or(0, |c| step_of(c, &u.device_id));
                    if tx.send(Ok(u)).await.is_err() {
                        return;
                    }
                }
                // A call is watched until it ended and each callee's outcome is known (its
                // receipts say ACKED while it rings); a message until every receipt is final.
                let kind = if record.is_some() {
                    PushKind::CallInvite
                } else {
                    PushKind::Message
                };
                if record.is_none_or(|c| c.end.is_some()) && states.values().all(|r| r.state.ends(kind)) {
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    // The caller went: its place among the watchers is free at once, not at the
                    // id's next receipt.
                    _ = tx.closed() => return,
                    end = key.ended() => { let _ = tx.send(Err(key_status(end))).await; return; }
                    r = changes.recv() => match r {
                        Heard::Item(r) => pending.push(r),
                        Heard::Lagged => match current_receipts(&hub, &id, call).await {
                            Ok(all) => pending = all,
                            Err(e) => { let _ = tx.send(Err(store_status(e))).await; return; }
                        },
                    },
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// The receipts of `id` as stored: a call's from memory while its node holds them.
async fn current_receipts(hub: &Hub, id: &str, call: bool) -> Result<Vec<Receipt>, crate::store::StoreError> {
    match call {
        true => hub.call_receipts(id).await,
        false => hub.receipts(id).await,
    }
}

/// Whether `next` tells a watcher of a device more than `last` did: a later state, or the same
/// non-final state with another path or reason (a VoIP leg's outcome).
fn advances(last: &Receipt, next: &Receipt) -> bool {
    // A call's ACKED (it rang) is followed by the callee's outcome.
    let rank = |s: ReceiptState| match s {
        ReceiptState::Accepted => 0,
        ReceiptState::Delivered => 1,
        ReceiptState::Acked => 2,
        _ => 3,
    };
    if rank(last.state) == 3 || rank(next.state) < rank(last.state) {
        return false;
    }
    next.state != last.state || next.path != last.path || next.reason != last.reason
}

#[tonic::async_trait]
impl push_sender_server::PushSender for Api {
    async fn send_message(
        &self,
        req: Request<SendMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        let sender = self.authorize(&req, Scope::Send)?;
        let r = req.into_inner();
        let (device_ids, group) = targets(r.target, self.hub.limits().max_name_bytes)?;
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
                    sender.name().to_string()
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
        let key = self.authorize(&req, Scope::Read)?;
        Ok(Response::new(
            self.watch(req.into_inner().message_id, key, false).await?,
        ))
    }

    async fn place_call(
        &self,
        req: Request<PlaceCallRequest>,
    ) -> Result<Response<PlaceCallResponse>, Status> {
        let caller = self.authorize(&req, Scope::Call)?;
        let r = req.into_inner();
        let (device_ids, group) = targets(r.target, self.hub.limits().max_name_bytes)?;
        let mut escalation = Vec::with_capacity(r.escalation.len());
        for step in r.escalation {
            let (device_ids, group) = targets(step.target, self.hub.limits().max_name_bytes)?;
            escalation.push(EscalationStep {
                device_ids,
                group,
                after_secs: step.after_seconds,
                stop_earlier: step.stop_earlier,
            });
        }
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
                escalation,
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
        let key = self.authorize(&req, Scope::Read)?;
        Ok(Response::new(
            self.watch(req.into_inner().call_id, key, true).await?,
        ))
    }

    async fn get_call_status(&self, req: Request<WatchCallRequest>) -> Result<Response<CallStatus>, Status> {
        self.authorize(&req, Scope::Read)?;
        let call_id = req.into_inner().call_id;
        let record = self
            .hub
            .find_call(&call_id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no call {call_id:?} is ringing or remembered")))?;
        let receipts = self.hub.call_receipts(&call_id).await.map_err(store_status)?;
        Ok(Response::new(call_status(record, receipts)))
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
            .await
            .map_err(store_status)?
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
                clock_offset_ms: v.clock_offset_ms,
                last_disconnect_reason: v.record.last_disconnect_reason,
                queued: v.queued as u32,
                revoked: v.record.revoked,
                node: v.node.unwrap_or_default(),
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
        let key = self.authorize(&req, Scope::Read)?;
        let mut events = self.hub.subscribe_presence();
        let (tx, rx) = mpsc::channel(256);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    end = key.ended() => { let _ = tx.send(Err(key_status(end))).await; return; }
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
        let caller = Caller {
            key: &admin,
            source: req.remote_addr(),
            via: "grpc",
        };
        let r = req.into_inner();
        let credential = self
            .enroller
            .issue_credential(caller, &r.device_id, r.groups, r.valid_days)
            .await
            .map_err(enroll_status)?;
        Ok(Response::new(IssueDeviceCredentialResponse {
            device_id: r.device_id,
            credential: credential.token,
            expires_at_ms: credential.expires_at_ms,
        }))
    }

    async fn enroll_device(&self, req: Request<EnrollDeviceRequest>) -> Result<Response<Enrollment>, Status> {
        let key = self.caller(&req)?;
        let source: Option<SocketAddr> = req.remote_addr();
        let caller = Caller {
            key: &key,
            source,
            via: "grpc",
        };
        let enrollment = self
            .enroller
            .enroll(req.into_inner(), caller)
            .await
            .map_err(enroll_status)?;
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
        let (key, summary) = self
            .keys
            .create(NewKey {
                name: r.name,
                scopes: r.scopes,
                valid_days: r.valid_days,
                enroll_groups: r.enroll_groups,
            })
            .await
            .map_err(key_status)?;
        tracing::info!(api_key = %admin.name(), name = %summary.name, key_id = %summary.id, scopes = ?summary.scopes, "API key created");
        Ok(Response::new(CreateApiKeyResponse {
            name: summary.name,
            api_key: key,
            key_id: summary.id,
            expires_at_ms: summary.expires_at_ms,
        }))
    }

    async fn list_api_keys(
        &self,
        req: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        self.authorize(&req, Scope::Admin)?;
        let keys = self.keys.list().map_err(key_status)?;
        Ok(Response::new(ListApiKeysResponse {
            keys: keys.into_iter().map(key_info).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        req: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        let admin = self.authorize(&req, Scope::Admin)?;
        let id = req.into_inner().key_id;
        let summary = self.keys.revoke(&id).await.map_err(|e| match e {
            KeyError::Unknown => Status::not_found(format!("no API key with id {id:?}")),
            e => key_status(e),
        })?;
        tracing::info!(api_key = %admin.name(), name = %summary.name, key_id = %summary.id, "API key revoked");
        Ok(Response::new(RevokeApiKeyResponse {
            key: Some(key_info(summary)),
        }))
    }

    type BackupStream = BoxStream<BackupChunk>;

    async fn backup(&self, req: Request<BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        let admin = self.authorize(&req, Scope::Admin)?;
        let (dir, store) = (self.data_dir.clone(), self.store.clone());
        let taken = tokio::task::spawn_blocking(move || crate::backup::open_snapshot(&dir, &*store))
            .await
            .map_err(|e| Status::internal(format!("backup task failed: {e}")))?;
        let (manifest, file) = taken.map_err(|e| match e {
            crate::backup::BackupError::Store(crate::store::StoreError::Unsupported(m)) => {
                Status::failed_precondition(m)
            }
            e => {
                tracing::error!(error = %e, "backup failed");
                Status::internal(format!("backup failed: {e}"))
            }
        })?;
        tracing::info!(
            api_key = %admin.name(),
            files = ?manifest.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            "backup taken"
        );
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || send_backup(file, &manifest, &tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn rotate_ca(&self, req: Request<RotateCaRequest>) -> Result<Response<RotateCaResponse>, Status> {
        let admin = self.authorize(&req, Scope::Admin)?;
        let rotator = self.rotator.clone();
        let pki = tokio::task::spawn_blocking(move || rotator.rotate())
            .await
            .map_err(|e| Status::internal(format!("rotation task failed: {e}")))?
            .map_err(|e| {
                tracing::error!(error = %e, "CA rotation failed");
                Status::internal(format!("CA rotation failed: {e}"))
            })?;
        self.enroller.set_trust(&pki);
        self.hub.set_ca_generation(pki.ca_generation);
        tracing::info!(api_key = %admin.name(), generation = pki.ca_generation, "CA rotation asked through the API");
        Ok(Response::new(RotateCaResponse {
            generation: pki.ca_generation,
            ca_pin: pki.ca_pin,
            next_ca_pin: pki.next_ca_pin,
            ca_certificate: pki.ca_cert_pem,
        }))
    }
}

/// Stream a backup file in chunks of 64 KiB; the last (possibly empty) one names its contents,
/// so a client can tell a whole backup from one cut short.
fn send_backup(
    mut file: std::fs::File,
    manifest: &crate::backup::Manifest,
    tx: &mpsc::Sender<Result<BackupChunk, Status>>,
) {
    use std::io::Read as _;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(format!("reading the backup: {e}"))));
                return;
            }
        };
        let last = n == 0;
        let chunk = BackupChunk {
            data: buf[..n].to_vec(),
            created_at_ms: if last { manifest.created_at_ms } else { 0 },
            files: if last {
                manifest.files.iter().map(|f| f.path.clone()).collect()
            } else {
                Vec::new()
            },
        };
        if tx.blocking_send(Ok(chunk)).is_err() || last {
            return;
        }
    }
}

fn key_info(k: KeySummary) -> ApiKeyInfo {
    ApiKeyInfo {
        key_id: k.id,
        name: k.name,
        scopes: k.scopes,
        enroll_groups: k.enroll_groups,
        created_at_ms: k.created_at_ms,
        expires_at_ms: k.expires_at_ms,
        revoked_at_ms: k.revoked_at_ms,
        state: match k.state {
            KeyState::Active => ApiKeyState::Active,
            KeyState::Expired => ApiKeyState::Expired,
            KeyState::Revoked => ApiKeyState::Revoked,
        } as i32,
    }
}

/// Refused keys are UNAUTHENTICATED with the reason (unknown, revoked, expired at ...).
fn key_status(e: KeyError) -> Status {
    match e {
        KeyError::Missing | KeyError::Unknown | KeyError::Revoked { .. } | KeyError::Expired { .. } => {
            Status::unauthenticated(e.to_string())
        }
        KeyError::Forbidden(..) => Status::permission_denied(e.to_string()),
        KeyError::Invalid(m) => Status::invalid_argument(m),
        KeyError::Refused(m) => Status::failed_precondition(m),
        KeyError::Store(e) => store_status(e),
    }
}

/// The devices or group a send names. Ids and group names follow the rule of enrollment (1-128
/// bytes, no control characters), so a sender cannot make receipts, logs or the store carry
/// kilobytes per recipient.
fn targets(target: Option<Target>, max_name: usize) -> Result<(Vec<String>, Option<String>), Status> {
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
        check_name("device_id", id, max_name).map_err(enroll_status)?;
    }
    if let Some(g) = &group {
        check_name("group", g, max_name).map_err(enroll_status)?;
    }
    Ok((ids, group))
}

/// The gRPC API over TLS 1.3 (same certificate as the device listener, ALPN h2), with health
/// and reflection so grpcurl-style tools work.
pub(crate) fn serve(
    listener: TcpListener,
    certs: Arc<pki::CertSlot>,
    limits: Limits,
    api: Api,
    shutdown: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let mut tls = pki::server_config_from(certs)?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(push_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // v1alpha too: older grpcurl and the grpcio-based clients only ask for it.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(push_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let incoming = tls_incoming(listener, acceptor, limits, shutdown.clone(), Listener::Api);
    let incoming = ReceiverStream::new(incoming).map(|(tls, _peer)| Ok::<_, std::io::Error>(tls));
    let sender = api.sender();
    let admin = api.admin();
    Ok(async move {
        health
            .set_serving::<push_sender_server::PushSenderServer<Api>>()
            .await;
        health
            .set_serving::<push_admin_server::PushAdminServer<Api>>()
            .await;
        let result = tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(
                oversized_is_resource_exhausted::<tonic::body::Body>,
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(sender)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "API server failed");
        }
    })
}

/// Tonic answers a request over its message size limit with OUT_OF_RANGE, which clients treat
/// as a bad argument value; gRPC's convention (and every other gRPC server) says
/// RESOURCE_EXHAUSTED. Such an answer is trailers-only (the status is in the headers), since
/// the request was refused before the handler ran, so only those headers need rewriting.
fn oversized_is_resource_exhausted<B>(mut res: http::Response<B>) -> http::Response<B> {
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
        ReceiptState::Answered => DeliveryState::Answered,
        ReceiptState::Declined => DeliveryState::Declined,
        ReceiptState::Missed => DeliveryState::Missed,
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
        step: 0,
    }
}

/// The step that rang `device_id` in `call`.
fn step_of(call: &CallRecord, device_id: &str) -> u32 {
    call.callees
        .iter()
        .find(|c| c.device_id == device_id)
        .map_or(0, |c| c.step)
}

/// The whole picture of a call: its record and every callee's receipt.
fn call_status(call: CallRecord, receipts: Vec<Receipt>) -> CallStatus {
    let (state, answered_by) = match &call.end {
        None => (CallState::Ringing, String::new()),
        Some(CallEnd::Answered { device_id, .. }) => (CallState::Answered, device_id.clone()),
        Some(CallEnd::Declined { .. }) => (CallState::Declined, String::new()),
        Some(CallEnd::Missed { .. }) => (CallState::Missed, String::new()),
        Some(CallEnd::Cancelled { .. }) => (CallState::Cancelled, String::new()),
    };
    let callees = receipts
        .into_iter()
        .map(|r| {
            let step = step_of(&call, &r.device_id);
            DeliveryUpdate { step, ..update(r) }
        })
        .collect();
    CallStatus {
        call_uuid: push_proto::call_uuid(&call.call_id),
        call_id: call.call_id,
        state: state as i32,
        answered_by,
        placed_at_ms: call.placed_at_ms,
        ring_deadline_ms: call.deadline_ms,
        ended_at_ms: call.end.as_ref().map_or(0, CallEnd::at_ms),
        hung_up_at_ms: call.hung_up_at_ms,
        steps: call
            .steps
            .into_iter()
            .enumerate()
            .map(|(index, s)| CallStep {
                index: index as u32,
                due_at_ms: s.due_ms,
                started_at_ms: s.started_ms,
                stop_earlier: s.stop_earlier,
                device_ids: s.device_ids,
            })
            .collect(),
        callees,
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
        EnrollError::InvalidName(..) => Status::invalid_argument(e.to_string()),
        EnrollError::AlreadyEnrolled(_) => Status::already_exists(e.to_string()),
        EnrollError::NotAllowed(_) => Status::permission_denied(e.to_string()),
        EnrollError::RateLimited(_) => Status::resource_exhausted(e.to_string()),
        EnrollError::Store(e) => store_status(e),
    }
}

fn store_status(e: crate::store::StoreError) -> Status {
    tracing::error!(error = %e, "store failure");
    Status::unavailable(format!("storage unavailable: {e}"))
}
