//! The senders' face of the hub: queue messages, ring and cancel calls, read and watch
//! receipts and presence.

use std::collections::HashMap;

use push_proto::{
    device::{CallInvite, CancelReason, Message, push},
    sender::PresenceEvent,
};
use tokio::sync::broadcast;

use super::{
    Hub, Watch, WatchRefused,
    calls::CallCore,
    cluster::Routed,
    device::{Effects, Item},
    ids::{IdUse, call_digest, check_id, message_digest},
};
use crate::store::{Op, PushKind, Receipt, ReceiptState, RequestRecord, StoreError};

/// Why a send or call was refused as a whole. Per-recipient failures are receipts instead.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request is malformed or over a limit; nothing was queued.
    #[error("{0}")]
    Invalid(String),
    /// A call with this id is already ringing.
    #[error("call {0} already exists")]
    CallExists(String),
    /// The id was used before for another request (another kind or other content), or a
    /// request with it is still being placed.
    #[error("id {id:?} is already used by {what}; choose a new id")]
    IdInUse {
        /// The caller-chosen id.
        id: String,
        /// What holds it.
        what: &'static str,
    },
    /// No ringing call with this id.
    #[error("no ringing call {0}")]
    UnknownCall(String),
    /// The store failed; every recipient was reported undeliverable.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Recipients of a send queued under one store batch (their locks are held together while it
/// is decided and submitted): one submission and one commit's share instead of one each.
const BATCH_DEVICES: usize = 256;

/// Mark a recipient undeliverable, for `reason`.
fn refuse(outcome: &mut RecipientOutcome, reason: &str) {
    outcome.state = ReceiptState::Undeliverable;
    outcome.reason = reason.into();
}

/// A message to queue.
#[derive(Debug, Clone, Default)]
pub struct MessageRequest {
    /// Caller-chosen id (idempotency key); empty to let the server choose.
    pub id: String,
    /// Explicit recipients.
    pub device_ids: Vec<String>,
    /// A group whose members are recipients too.
    pub group: Option<String>,
    /// Title shown on the device.
    pub title: String,
    /// Body shown on the device.
    pub body: String,
    /// Opaque app data.
    pub data: Vec<u8>,
    /// `lpush.device.v1.Priority`.
    pub priority: i32,
    /// TTL seconds; 0 for the default.
    pub ttl_secs: u32,
    /// Collapse key; empty for none.
    pub collapse_key: String,
    /// Sender display name.
    pub sender: String,
}

/// A call to ring.
#[derive(Debug, Clone, Default)]
pub struct CallRequest {
    /// Caller-chosen call id.
    pub call_id: String,
    /// Explicit callees.
    pub device_ids: Vec<String>,
    /// A group whose members are callees too.
    pub group: Option<String>,
    /// Caller display name.
    pub caller_name: String,
    /// Caller handle (extension, number).
    pub caller_handle: String,
    /// Video call.
    pub video: bool,
    /// Ring seconds; 0 for the default (with a plan: its last step plus the default).
    pub ring_secs: u32,
    /// Who rings next while nobody answers.
    pub escalation: Vec<EscalationStep>,
}

/// One step of an escalation plan.
#[derive(Debug, Clone, Default)]
pub struct EscalationStep {
    /// Explicit callees.
    pub device_ids: Vec<String>,
    /// A group whose members are callees too.
    pub group: Option<String>,
    /// Seconds after the previous step started before this one rings.
    pub after_secs: u32,
    /// Whether earlier steps stop ringing when this one starts.
    pub stop_earlier: bool,
}

/// The ring time of a call: as asked, or the default (after the plan's last step), within
/// the limits; the plan's steps each start before the deadline.
fn ring_secs(req: &CallRequest, limits: &crate::config::Limits) -> Result<u32, SendError> {
    let invalid = |why: String| Err(SendError::Invalid(why));
    if req.escalation.len() > limits.max_escalation_steps {
        return invalid(format!(
            "{} escalation steps exceed the limit of {}",
            req.escalation.len(),
            limits.max_escalation_steps
        ));
    }
    if let Some(k) = req.escalation.iter().position(|s| s.after_secs == 0) {
        return invalid(format!(
            "escalation step {} must start at least 1 s after the one before",
            k + 1
        ));
    }
    let last_step: u64 = req.escalation.iter().map(|s| u64::from(s.after_secs)).sum();
    let ring = match req.ring_secs {
        0 => last_step + u64::from(limits.default_ring_secs),
        asked => u64::from(asked),
    };
    if ring > u64::from(limits.max_ring_secs) {
        return invalid(format!(
            "ring timeout {ring}s exceeds the maximum {}s",
            limits.max_ring_secs
        ));
    }
    if !req.escalation.is_empty() && last_step >= ring {
        return invalid(format!(
            "the last escalation step starts after {last_step}s, at or after the ring deadline ({ring}s)"
        ));
    }
    Ok(ring as u32)
}

/// Outcome for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientOutcome {
    /// Recipient.
    pub device_id: String,
    /// `Accepted`, or a final state with `reason`.
    pub state: ReceiptState,
    /// Why it is final.
    pub reason: String,
}

/// Outcome of a send or call.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Message or call id.
    pub id: String,
    /// Per recipient.
    pub recipients: Vec<RecipientOutcome>,
    /// TTL end or ring deadline, Unix ms.
    pub expires_at_ms: i64,
}

impl Hub {
    /// Queue a message for its recipients; returns once it is durable.
    pub async fn send_message(&self, req: MessageRequest) -> Result<Sent, SendError> {
        let limits = self.limits();
        let size =
            req.title.len() + req.body.len() + req.data.len() + req.collapse_key.len() + req.sender.len();
        if size > limits.max_message_bytes {
            return Err(SendError::Invalid(format!(
                "message is {size} bytes; the limit is {} (title + body + data + collapse key + sender)",
                limits.max_message_bytes
            )));
        }
        if req.ttl_secs > limits.max_ttl_secs {
            return Err(SendError::Invalid(format!(
                "ttl {}s exceeds the maximum {}s",
                req.ttl_secs, limits.max_ttl_secs
            )));
        }
        check_id(&req.id, limits.max_id_bytes)?;
        let id = if req.id.is_empty() {
            // A v4 UUID from the thread's CSPRNG: `new_v4` makes a getrandom syscall per id.
            uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string()
        } else {
            req.id.clone()
        };
        let targets = self.resolve(&req.device_ids, req.group.as_deref()).await?;
        let digest = message_digest(&req);
        let claim = if req.id.is_empty() {
            None
        } else {
            match self.claim_id(&id, PushKind::Message, &digest)? {
                IdUse::Same(previous) => return self.previous_outcome(id, &previous),
                IdUse::New(claim) => Some(claim),
            }
        };
        let now = self.now();
        let ttl = if req.ttl_secs == 0 {
            limits.default_ttl_secs
        } else {
            req.ttl_secs
        };
        let expires = now + i64::from(ttl) * 1000;
        let request = claim.as_ref().map(|_| Op::PutRequest {
            id: id.clone(),
            record: RequestRecord {
                kind: PushKind::Message,
                digest,
                at_ms: now,
                expires_at_ms: expires,
            },
        });
        let message = Message {
            title: req.title,
            body: req.body,
            data: req.data,
            priority: req.priority,
            collapse_key: req.collapse_key.clone(),
            sent_at_ms: now,
            expires_at_ms: expires,
            sender: req.sender,
        };
        let item = Item::new(
            id,
            PushKind::Message,
            req.collapse_key,
            expires,
            push::Body::Message(message),
        );
        let (recipients, _) = self
            .enqueue_all(&item, &targets, request.into_iter().collect(), now)
            .await?;
        drop(claim);
        Ok(Sent {
            id: item.id,
            recipients,
            expires_at_ms: expires,
        })
    }

    /// Ring callees until someone answers, everyone declined, the caller cancels or the ring
    /// deadline passes, escalating by the plan; returns once the first step's invites are
    /// durable, with the call's record (what the placement then decides is stored in the
    /// background: a restart rebuilds it from the queued invites, `Calls::restore_invite`).
    pub async fn place_call(&self, req: CallRequest) -> Result<(Sent, String), SendError> {
        let limits = self.limits();
        if req.call_id.is_empty() {
            return Err(SendError::Invalid("call_id is required".into()));
        }
        check_id(&req.call_id, limits.max_id_bytes)?;
        let size = req.caller_name.len() + req.caller_handle.len();
        if size > limits.max_caller_bytes {
            return Err(SendError::Invalid(format!(
                "caller name and handle exceed {} bytes",
                limits.max_caller_bytes
            )));
        }
        let ring = ring_secs(&req, limits)?;
        let targets = self.resolve(&req.device_ids, req.group.as_deref()).await?;
        let mut plan = Vec::with_capacity(req.escalation.len());
        for step in &req.escalation {
            plan.push(self.resolve(&step.device_ids, step.group.as_deref()).await?);
        }
        let uuid = push_proto::call_uuid(&req.call_id);
        let digest = call_digest(&req);
        let claim = match self.claim_id(&req.call_id, PushKind::CallInvite, &digest)? {
            IdUse::Same(previous) => return Ok((self.previous_outcome(req.call_id, &previous)?, uuid)),
            IdUse::New(claim) => claim,
        };
        let now = self.now();
        let deadline = now + i64::from(ring) * 1000;
        let request = Op::PutRequest {
            id: req.call_id.clone(),
            record: RequestRecord {
                kind: PushKind::CallInvite,
                digest,
                at_ms: now,
                expires_at_ms: deadline,
            },
        };
        let invite = CallInvite {
            call_id: req.call_id.clone(),
            call_uuid: uuid.clone(),
            caller_name: req.caller_name,
            caller_handle: req.caller_handle,
            video: req.video,
            created_at_ms: now,
            ring_deadline_ms: deadline,
        };
        let mut due = now;
        let later = req
            .escalation
            .iter()
            .zip(plan)
            .map(|(step, devices)| {
                due += i64::from(step.after_secs) * 1000;
                (due, step.stop_earlier, devices)
            })
            .collect();
        let call = CallCore::new(invite, now, targets.clone(), later);
        let item = call.invite_item();
        // Embedded, the record is stored with the invites (in a cluster, Redis holds it).
        let mut stored_with = vec![request];
        if !self.is_clustered() {
            stored_with.push(Op::PutCall(call.record().clone()));
        }
        if !self.open_call(call).await? {
            return Err(SendError::CallExists(req.call_id));
        }
        let result = self.enqueue_all(&item, &targets, stored_with, now).await;
        drop(claim);
        let (recipients, seqs) = match result {
            Ok(placed) => placed,
            Err(e) => {
                // Nothing rings (the sender retries the whole call): it ends here, cancelled.
                self.drop_unplaced_call(&req.call_id);
                if let Some(Err(e)) = self
                    .cancel_decided_call(&req.call_id, CancelReason::CallerCancelled)
                    .await
                {
                    tracing::warn!(call = %req.call_id, error = %e, "unplaced call not closed in the store");
                }
                return Err(e);
            }
        };
        // What became of each invite: a phone may have acked one before this returned (the
        // call kept the note), a cancel may have ended the call meanwhile (the call stops the
        // invites it now learns of), a refused one may leave nobody ringing (the next step).
        let queued_here: HashMap<&str, u64> = seqs.iter().map(|(d, s)| (d.as_str(), *s)).collect();
        let placed: Vec<(String, Option<u64>)> = recipients
            .iter()
            .map(|r| {
                let seq = queued_here.get(r.device_id.as_str()).copied();
                let refused = r.state != ReceiptState::Accepted;
                (r.device_id.clone(), if refused { None } else { seq.or(Some(0)) })
            })
            .collect();
        let pending = self.call_placed(&req.call_id, self.ctx(), &placed).await;
        self.plan_voip(&seqs);
        if !pending.is_empty() {
            let (hub, call_id) = (self.clone(), req.call_id.clone());
            tokio::spawn(async move {
                if let Err(e) = hub.settle(pending).await {
                    tracing::warn!(call = %call_id, error = %e, "call placement not stored");
                }
            });
        }
        Ok((
            Sent {
                id: item.id,
                recipients,
                expires_at_ms: deadline,
            },
            uuid,
        ))
    }

    /// Stop ringing: invites not yet written are withdrawn, devices that got one are sent a
    /// cancel. Returns how many cancels were sent.
    pub async fn cancel_call(&self, call_id: &str, reason: CancelReason) -> Result<u32, SendError> {
        match self.cancel_decided_call(call_id, reason).await {
            Some(result) => Ok(result?),
            // A call placed by a node of an older release has no record: its request and
            // receipts name its callees.
            None if self.is_clustered() => self.cancel_call_cluster(call_id, reason).await,
            None => Err(SendError::UnknownCall(call_id.into())),
        }
    }

    /// Cluster mode: the call may have been placed on any node, and its callees may be held by
    /// any node: its request record gives the deadline, its receipts the callees, and each
    /// callee's holder (or next holder) withdraws the invite and queues the cancel.
    async fn cancel_call_cluster(&self, call_id: &str, reason: CancelReason) -> Result<u32, SendError> {
        let unknown = || SendError::UnknownCall(call_id.into());
        let request = self.0.store.request(call_id)?.ok_or_else(unknown)?;
        if request.kind != PushKind::CallInvite {
            return Err(unknown());
        }
        self.0.calls.lock().close(call_id);
        let cx = self.ctx();
        if cx.now >= request.expires_at_ms {
            return Ok(0);
        }
        let uuid = push_proto::call_uuid(call_id);
        let cancel = super::device::cancel_item(call_id, &uuid, request.expires_at_ms, reason);
        let (mut pending, mut sent) = (Vec::new(), 0);
        for r in self.0.store.receipts(call_id)? {
            if let Some(device) = self.device(&r.device_id) {
                let slot = &mut *device.lock();
                let mut fx = Effects::default();
                if slot.core.withdraw_call(&mut fx, cx, call_id)
                    && slot.core.enqueue(&mut fx, cx, &cancel).is_ok()
                {
                    sent += 1;
                }
                pending.push(self.apply(slot, fx));
            } else if self.forward_withdraw(&r.device_id, call_id, &cancel).await {
                sent += 1;
            }
        }
        self.settle(pending).await?;
        Ok(sent)
    }

    /// Expand explicit ids and a group into distinct recipients, within the limit.
    async fn resolve(&self, device_ids: &[String], group: Option<&str>) -> Result<Vec<String>, SendError> {
        let mut targets: Vec<String> = device_ids.to_vec();
        if let Some(g) = group {
            targets.extend(self.group_members(g).await?);
        }
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err(SendError::Invalid(match group {
                Some(g) => format!("group {g:?} has no devices"),
                None => "no recipients".into(),
            }));
        }
        if targets.len() > self.limits().max_recipients {
            return Err(SendError::Invalid(format!(
                "{} recipients exceed the limit of {}",
                targets.len(),
                self.limits().max_recipients
            )));
        }
        Ok(targets)
    }

    /// Queue `item` for every target and wait until durable. Returns the outcomes and the
    /// sequence number each accepted recipient got.
    /// `stored_with` (the caller-chosen id's record, a call's record) is stored after them when
    /// any recipient accepted.
    async fn enqueue_all(
        &self,
        item: &Item,
        targets: &[String],
        stored_with: Vec<Op>,
        now: i64,
    ) -> Result<(Vec<RecipientOutcome>, Vec<(String, u64)>), SendError> {
        let mut pending = Vec::new();
        let mut outcomes = Vec::with_capacity(targets.len());
        let mut seqs = Vec::with_capacity(targets.len());
        let cx = super::device::Ctx { now, ..self.ctx() };
        let (mut accepted, mut unavailable) = (false, None);
        // Indices of the targets held here whose batch is not yet queued.
        let mut here = Vec::with_capacity(targets.len().min(BATCH_DEVICES));
        for (i, device_id) in targets.iter().enumerate() {
            let refused = match self.route_item(device_id, item, now).await {
                Ok(Routed::Here) => {
                    here.push(i);
                    None
                }
                Ok(Routed::Forwarded) => {
                    accepted = true;
                    None
                }
                Ok(Routed::Refused(reason)) => Some(reason),
                Err(e) => {
                    unavailable = Some(e);
                    Some("the cluster store is unavailable")
                }
            };
            outcomes.push(RecipientOutcome {
                device_id: device_id.clone(),
                state: ReceiptState::Accepted,
                reason: String::new(),
            });
            if let Some(reason) = refused {
                refuse(&mut outcomes[i], reason);
            }
            if here.len() == BATCH_DEVICES || (i + 1 == targets.len() && !here.is_empty()) {
                let ids: Vec<&str> = here.iter().map(|&i| targets[i].as_str()).collect();
                let (results, batch) = self.enqueue_batch(&ids, item, cx);
                pending.push(batch);
                for (i, result) in here.drain(..).zip(results) {
                    match result {
                        Ok(seq) => seqs.push((targets[i].clone(), seq)),
                        Err(reason) => refuse(&mut outcomes[i], reason),
                    }
                }
            }
        }
        accepted |= !seqs.is_empty();
        // Nobody could be reached: the sender retries the whole request (same id) later.
        if let Some(e) = unavailable.filter(|_| !accepted) {
            return Err(e.into());
        }
        if accepted && !stored_with.is_empty() {
            pending.push(self.submit(stored_with));
        }
        if let Err(e) = self.settle(pending).await {
            // Cluster mode: a device another node took meanwhile was let go here; its push goes
            // through the device's inbox instead (the fenced write left nothing of it).
            if matches!(e, StoreError::Fenced(_)) {
                return self.reroute_fenced(item, outcomes, seqs, now).await;
            }
            // Not durable: withdraw what is still queued so the sender's retry is the only copy.
            for (device_id, seq) in &seqs {
                if let Some(device) = self.device(device_id) {
                    let slot = &mut *device.lock();
                    let mut fx = Effects::default();
                    slot.core.withdraw_unstored(&mut fx, cx, *seq);
                    let pending = self.apply(slot, fx);
                    self.release(pending);
                }
            }
            return Err(e.into());
        }
        Ok((outcomes, seqs))
    }

    /// After a fenced write: forward `item` to each device no longer held here; keep the others.
    async fn reroute_fenced(
        &self,
        item: &Item,
        outcomes: Vec<RecipientOutcome>,
        seqs: Vec<(String, u64)>,
        now: i64,
    ) -> Result<(Vec<RecipientOutcome>, Vec<(String, u64)>), SendError> {
        let mut kept = Vec::with_capacity(seqs.len());
        for (device_id, seq) in seqs {
            if self.device(&device_id).is_some() {
                kept.push((device_id, seq));
                continue;
            }
            match self.route_item(&device_id, item, now).await? {
                Routed::Forwarded => {}
                // Held here again already (a login raced in): it reached its queue through the
                // claim's fresh state or will through this retry of the sender.
                Routed::Here | Routed::Refused(_) => {
                    return Err(SendError::Store(StoreError::Fenced(device_id)));
                }
            }
        }
        Ok((outcomes, kept))
    }

    /// Queue `item` for devices held here (`device_ids` in ascending order), in one store
    /// batch. Each device's lock is held from its decision until the batch is submitted, so the
    /// stored order is still every device's decided order (see [`Hub::apply`]); locks are taken
    /// in id order, and no other holder of a device's lock waits for another device's.
    /// Returns each device's result, in order, and the batch.
    fn enqueue_batch(
        &self,
        device_ids: &[&str],
        item: &Item,
        cx: super::device::Ctx,
    ) -> (Vec<Result<u64, &'static str>>, super::Pending) {
        debug_assert!(device_ids.is_sorted(), "locks are taken in id order");
        let devices: Vec<_> = {
            let map = self.0.devices.read();
            device_ids.iter().map(|id| map.get(*id).cloned()).collect()
        };
        let mut results = Vec::with_capacity(devices.len());
        let mut held = Vec::with_capacity(devices.len());
        let (mut ops, mut timers) = (Vec::new(), Vec::new());
        for device in &devices {
            // Answered in the response only: nothing is kept, stored or counted per unknown
            // id, so a sender naming junk ids cannot grow the server.
            let Some(device) = device else {
                results.push(Err("unknown device"));
                continue;
            };
            let mut slot = device.lock();
            let mut fx = Effects::default();
            results.push(slot.core.enqueue(&mut fx, cx, item));
            ops.append(&mut fx.ops);
            timers.append(&mut fx.timers);
            held.push((slot, fx));
        }
        let batch = self.submit(ops);
        self.apply_timers(timers);
        for (slot, fx) in held {
            self.apply_submitted(&slot, fx);
        }
        (results, batch)
    }

    /// Queue `item` for a device held here (every device, in embedded mode).
    pub(super) fn enqueue_here(
        &self,
        device_id: &str,
        item: &Item,
        cx: super::device::Ctx,
        pending: &mut Vec<super::Pending>,
    ) -> Result<u64, &'static str> {
        // Answered in the response only: nothing is kept, stored or counted per unknown id, so
        // a sender naming junk ids cannot grow the server.
        let device = self.device(device_id).ok_or("unknown device")?;
        let slot = &mut *device.lock();
        let mut fx = Effects::default();
        let result = slot.core.enqueue(&mut fx, cx, item);
        pending.push(self.apply(slot, fx));
        result
    }

    /// A call's invites are durable: plan each callee's VoIP leg (see `fallback.rs`).
    pub(super) fn plan_voip(&self, seqs: &[(String, u64)]) {
        if self.0.bridge.is_none() {
            return;
        }
        let cx = self.ctx();
        for (device_id, seq) in seqs {
            if let Some(device) = self.device(device_id) {
                let slot = &mut *device.lock();
                let mut fx = Effects::default();
                slot.core.plan_voip(&mut fx, cx, *seq);
                let pending = self.apply(slot, fx);
                self.release(pending);
            }
        }
    }

    /// Presence changes of every device as they happen.
    pub fn subscribe_presence(&self) -> broadcast::Receiver<PresenceEvent> {
        self.0.presence.watch_all()
    }

    /// Receipt changes of every push as they happen (the dashboard's feed).
    pub fn subscribe_receipts(&self) -> broadcast::Receiver<Receipt> {
        self.0.receipts.watch_all()
    }

    /// Receipt changes of message or call `id` only, from now on; refused over
    /// `limits.max_watchers_per_id` and `limits.max_watchers`.
    pub fn watch_receipts(&self, id: &str) -> Result<Watch<Receipt>, WatchRefused> {
        self.0.receipts.watch(id)
    }

    /// Stored receipts of push `id`, after everything submitted so far is durable (so a status
    /// read never misses a change that was already announced).
    pub async fn receipts(&self, id: &str) -> Result<Vec<Receipt>, StoreError> {
        crate::store::commit(&*self.0.store, Vec::new()).await?;
        self.0.store.receipts(id)
    }
}
