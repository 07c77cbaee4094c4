//! Queueing pushes for devices, handing them to sessions, and settling them (ack, cancel).

use std::{collections::HashMap, sync::Arc};

use prost::Message as _;
use push_proto::device::{CallCancel, CallInvite, CancelReason, Message, Push, push};

use super::{DeviceState, Hub, Queued, SEQ_BLOCK, now_ms};
use crate::store::{Op, PushKind, Receipt, ReceiptState, RequestRecord, StoreError, StoredPush};

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
    /// Ring seconds; 0 for the default.
    pub ring_secs: u32,
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

/// A ringing call, kept to route its cancel.
#[derive(Debug, Clone)]
pub(super) struct CallRecord {
    pub(super) deadline_ms: i64,
    uuid: String,
    /// Callee -> (invite seq, acknowledged).
    callees: HashMap<String, (u64, bool)>,
}

/// Rebuild the call table from a queued invite at start-up.
pub(super) fn remember_call(calls: &mut HashMap<String, CallRecord>, stored: &StoredPush) {
    if stored.kind != PushKind::CallInvite {
        return;
    }
    if let Ok(Push {
        body: Some(push::Body::CallInvite(invite)),
        ..
    }) = Push::decode(&stored.encoded[..])
    {
        calls
            .entry(stored.id.clone())
            .or_insert_with(|| CallRecord {
                deadline_ms: invite.ring_deadline_ms,
                uuid: invite.call_uuid,
                callees: HashMap::new(),
            })
            .callees
            .insert(stored.device_id.clone(), (stored.seq, false));
    }
}

/// Reserve the next block of sequence numbers durably, ahead of need: once fewer than half a
/// block is left below the ceiling (or none: a restored or fresh device). The reservation is
/// durable a commit later, so pushes to a device with a live session normally find their
/// number already below the durable ceiling and go out at once instead of after an fsync.
pub(super) fn reserve_seq(d: &mut DeviceState, ops: &mut Vec<Op>) {
    if d.next_seq + SEQ_BLOCK / 2 >= d.ceiling {
        d.ceiling = d.ceiling.max(d.next_seq) + SEQ_BLOCK;
        ops.push(Op::PutSeqCeiling {
            device_id: d.record.device_id.clone(),
            ceiling: d.ceiling,
        });
    }
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
        check_id(&req.id)?;
        let id = if req.id.is_empty() {
            // A v4 UUID from the thread's CSPRNG: `new_v4` makes a getrandom syscall per id.
            uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string()
        } else {
            req.id.clone()
        };
        let targets = self.resolve(&req.device_ids, req.group.as_deref())?;
        let digest = message_digest(&req);
        let claim = if req.id.is_empty() {
            None
        } else {
            match self.claim_id(&id, PushKind::Message, &digest)? {
                IdUse::Same(previous) => return self.previous_outcome(id, &previous),
                IdUse::New(claim) => Some(claim),
            }
        };
        let now = now_ms();
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
        let item = Item {
            id,
            kind: PushKind::Message,
            collapse_key: req.collapse_key,
            expires,
            body: push::Body::Message(message),
        };
        let (recipients, _) = self.enqueue_all(&item, &targets, request, now).await?;
        drop(claim);
        Ok(Sent {
            id: item.id,
            recipients,
            expires_at_ms: expires,
        })
    }

    /// Ring callees until the ring deadline; returns once the invites are durable.
    pub async fn place_call(&self, req: CallRequest) -> Result<(Sent, String), SendError> {
        let limits = self.limits();
        if req.call_id.is_empty() {
            return Err(SendError::Invalid("call_id is required".into()));
        }
        check_id(&req.call_id)?;
        if req.ring_secs > limits.max_ring_secs {
            return Err(SendError::Invalid(format!(
                "ring timeout {}s exceeds the maximum {}s",
                req.ring_secs, limits.max_ring_secs
            )));
        }
        let size = req.caller_name.len() + req.caller_handle.len();
        if size > 1024 {
            return Err(SendError::Invalid(
                "caller name and handle exceed 1024 bytes".into(),
            ));
        }
        let targets = self.resolve(&req.device_ids, req.group.as_deref())?;
        let uuid = push_proto::call_uuid(&req.call_id);
        let digest = call_digest(&req);
        let claim = match self.claim_id(&req.call_id, PushKind::CallInvite, &digest)? {
            IdUse::Same(previous) => return Ok((self.previous_outcome(req.call_id, &previous)?, uuid)),
            IdUse::New(claim) => claim,
        };
        let now = now_ms();
        let ring = if req.ring_secs == 0 {
            limits.default_ring_secs
        } else {
            req.ring_secs
        };
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
        {
            let mut calls = self.0.calls.lock();
            if calls.contains_key(&req.call_id) {
                return Err(SendError::CallExists(req.call_id));
            }
            calls.insert(
                req.call_id.clone(),
                CallRecord {
                    deadline_ms: deadline,
                    uuid: uuid.clone(),
                    callees: HashMap::new(),
                },
            );
        }
        let invite = CallInvite {
            call_id: req.call_id.clone(),
            call_uuid: uuid.clone(),
            caller_name: req.caller_name,
            caller_handle: req.caller_handle,
            video: req.video,
            created_at_ms: now,
            ring_deadline_ms: deadline,
        };
        let item = Item {
            id: req.call_id.clone(),
            kind: PushKind::CallInvite,
            collapse_key: String::new(),
            expires: deadline,
            body: push::Body::CallInvite(invite),
        };
        let result = self.enqueue_all(&item, &targets, Some(request), now).await;
        drop(claim);
        let (recipients, seqs) = {
            let mut calls = self.0.calls.lock();
            match result {
                Ok((recipients, seqs)) => {
                    if let Some(call) = calls.get_mut(&req.call_id) {
                        // A phone may have taken and acked its invite before this commit
                        // returned: its entry exists already, marked acknowledged.
                        for (device_id, seq) in &seqs {
                            call.callees.entry(device_id.clone()).or_insert((*seq, false));
                        }
                    }
                    (recipients, seqs)
                }
                Err(e) => {
                    calls.remove(&req.call_id);
                    return Err(e);
                }
            }
        };
        // Outside the call table's lock: routing takes device locks (order: device, then calls).
        self.plan_voip(&seqs, now_ms());
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
        let call = self
            .0
            .calls
            .lock()
            .remove(call_id)
            .ok_or_else(|| SendError::UnknownCall(call_id.into()))?;
        let now = now_ms();
        if now >= call.deadline_ms {
            return Ok(0);
        }
        let cancel = Item {
            id: format!("{call_id}#cancel"),
            kind: PushKind::CallCancel,
            collapse_key: String::new(),
            expires: call.deadline_ms,
            body: push::Body::CallCancel(CallCancel {
                call_id: call_id.into(),
                call_uuid: call.uuid.clone(),
                reason: reason as i32,
            }),
        };
        let mut pending = Vec::new();
        let mut sent = 0;
        for (device_id, (seq, acked)) in &call.callees {
            let Some(device) = self.device(device_id) else {
                continue;
            };
            let mut ops = Vec::new();
            let mut d = device.lock();
            let reached = match d.outbox.get(seq).filter(|q| q.push.id == call_id) {
                Some(_) => {
                    let q = d.outbox.remove(seq).expect("present");
                    self.finish_queued(&mut ops, &q, ReceiptState::Cancelled, "call cancelled", now);
                    // A phone rung through APNs gets the cancel locally if it comes on-site in
                    // time; a cancel never goes as a VoIP push.
                    q.state == ReceiptState::Delivered || q.voip.may_have_rung()
                }
                None => *acked,
            };
            if reached && self.enqueue_locked(&mut d, &mut ops, &cancel, now).is_ok() {
                sent += 1;
            }
            pending.push(self.submit(ops));
        }
        self.settle(pending).await?;
        Ok(sent)
    }

    /// Pushes for the session to write: above `after_seq`, unexpired, durably numbered, at most
    /// `max`. Empty if `session_id` is no longer the device's session.
    pub fn take_pushes(&self, device_id: &str, session_id: u64, after_seq: u64, max: usize) -> Vec<Push> {
        let Some(device) = self.device(device_id) else {
            return Vec::new();
        };
        let mut d = device.lock();
        if d.session.as_ref().is_none_or(|s| s.id != session_id) {
            return Vec::new();
        }
        let now = now_ms();
        // `after_seq` comes from the peer (its floor): any value must be harmless here.
        let start = after_seq.saturating_add(1);
        if start >= d.durable_ceiling {
            return Vec::new();
        }
        let ceiling = d.durable_ceiling;
        d.outbox
            .range_mut(start..ceiling)
            .filter(|(_, q)| q.push.expires_at_ms > now)
            .take(max)
            .map(|(_, q)| {
                q.handed = true;
                &*q
            })
            .filter_map(|q| match Push::decode(&q.push.encoded[..]) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(device = device_id, seq = q.push.seq, error = %e, "undecodable queued push skipped");
                    None
                }
            })
            .collect()
    }

    /// The session wrote and flushed these pushes.
    pub fn mark_delivered(&self, device_id: &str, seqs: &[u64]) {
        let Some(device) = self.device(device_id) else {
            return;
        };
        let mut ops = Vec::new();
        let now = now_ms();
        let mut d = device.lock();
        for seq in seqs {
            if let Some(q) = d
                .outbox
                .get_mut(seq)
                .filter(|q| q.state == ReceiptState::Accepted)
            {
                q.state = ReceiptState::Delivered;
                let (push, latency) = (q.push.clone(), now - q.queued_ms);
                crate::observe::metrics::delivered(crate::observe::kind_str(push.kind), "local", latency);
                let r = super::receipt(
                    &push.id,
                    &push.device_id,
                    ReceiptState::Delivered,
                    "",
                    "local",
                    now,
                );
                self.announce(&mut ops, push.kind, r, Some(latency));
            }
        }
        self.persist(ops);
    }

    /// The device acknowledged pushes in this session.
    pub fn ack(&self, device_id: &str, session_id: u64, up_to: u64, seqs: &[u64]) {
        let Some(device) = self.device(device_id) else {
            return;
        };
        let mut ops = Vec::new();
        let mut d = device.lock();
        if d.session.as_ref().is_none_or(|s| s.id != session_id) {
            return;
        }
        self.ack_locked(&mut d, &mut ops, (up_to, seqs), true, now_ms());
        self.persist(ops);
    }

    /// Settle what the device acknowledged. `written_only`: an `Ack` frame can only acknowledge
    /// pushes handed to a session of the device (a push never handed out cannot have been seen,
    /// so an ack naming it is foreign or forged and must not become an ACKED receipt).
    pub(super) fn ack_locked(
        &self,
        d: &mut DeviceState,
        ops: &mut Vec<Op>,
        (up_to, seqs): (u64, &[u64]),
        written_only: bool,
        now: i64,
    ) {
        let eligible = |q: &Queued| !written_only || q.handed;
        let mut acked: Vec<u64> = d
            .outbox
            .range(..=up_to)
            .filter(|(_, q)| eligible(q))
            .map(|(s, _)| *s)
            .collect();
        acked.extend(seqs.iter().filter(|s| d.outbox.get(s).is_some_and(eligible)));
        acked.sort_unstable();
        acked.dedup();
        for seq in acked {
            let Some(q) = d.outbox.remove(&seq) else { continue };
            if q.push.kind == PushKind::CallInvite
                && let Some(call) = self.0.calls.lock().get_mut(&q.push.id)
            {
                // The ack can beat `place_call` recording its callees: record it here, so a
                // cancel still reaches this phone.
                call.callees.insert(q.push.device_id.clone(), (seq, true));
            }
            let latency = now - q.queued_ms;
            crate::observe::metrics::acked(crate::observe::kind_str(q.push.kind), latency);
            let r = super::receipt(
                &q.push.id,
                &q.push.device_id,
                ReceiptState::Acked,
                "",
                "local",
                now,
            );
            self.announce(ops, q.push.kind, r, Some(latency));
            self.forget(ops, &q.push);
        }
    }

    /// Apply the floor a device reported in its hello, under its lock (the rule is in
    /// `device.proto`, "Epochs and the floor"). Numbered by this store and below what it handed
    /// out: the floor is the device's cumulative acknowledgement. Otherwise (another epoch, a new
    /// install, a floor ahead of the server) it acknowledges nothing: queued pushes at or below
    /// it are renumbered above it, so they still reach the app, and numbering continues above it.
    pub(super) fn apply_floor(
        &self,
        d: &mut DeviceState,
        ops: &mut Vec<Op>,
        floor: u64,
        epoch: u64,
        now: i64,
    ) {
        // The session core refuses larger floors; clamp so no caller can push the counter up.
        let floor = floor.min(super::MAX_FLOOR - 1);
        let trusted = epoch == self.0.epoch && floor < d.next_seq;
        if !trusted {
            d.next_seq = d.next_seq.max(floor + 1);
        }
        // Even a trusted floor settles only what may have reached the device: handed to one of
        // its sessions in this process (marked before the write, so a write cut short by a
        // kill still counts), or restored from the store (written before a restart, perhaps).
        // A push below it that cannot have been seen (skipped as expired, or a lying floor)
        // moves above it.
        let (mut seen, mut unseen) = (Vec::new(), Vec::new());
        for (seq, q) in d.outbox.range(..=floor) {
            if trusted && (q.handed || q.restored) {
                seen.push(*seq);
            } else {
                unseen.push(*seq);
            }
        }
        self.ack_locked(d, ops, (0, &seen), false, now);
        for old in unseen {
            self.renumber_locked(d, ops, old, now);
        }
    }

    /// Give queued push `old` the device's next sequence number.
    fn renumber_locked(&self, d: &mut DeviceState, ops: &mut Vec<Op>, old: u64, now: i64) {
        let Some(q) = d.outbox.remove(&old) else { return };
        let seq = d.next_seq;
        d.next_seq += 1;
        let device_id = d.record.device_id.clone();
        ops.push(Op::DeletePush {
            device_id: device_id.clone(),
            seq: old,
        });
        let expires = q.push.expires_at_ms;
        self.0.deadlines.lock().remove(&(expires, device_id.clone(), old));
        let mut stored = (*q.push).clone();
        match Push::decode(&stored.encoded[..]) {
            Ok(mut push) => {
                push.seq = seq;
                stored.encoded = push.encode_to_vec();
                stored.seq = seq;
            }
            Err(e) => {
                tracing::error!(device = %device_id, seq = old, error = %e, "undecodable queued push dropped");
                self.receipt(
                    ops,
                    &q.push,
                    ReceiptState::Undeliverable,
                    "corrupt stored push",
                    now,
                );
                return;
            }
        }
        if stored.kind == PushKind::CallInvite
            && let Some(callee) = self
                .0
                .calls
                .lock()
                .get_mut(&stored.id)
                .and_then(|c| c.callees.get_mut(&device_id))
        {
            callee.0 = seq;
        }
        self.renumber_voip_due(&device_id, old, seq);
        self.0.deadlines.lock().insert((expires, device_id, seq));
        ops.push(Op::PutPush(stored.clone()));
        d.outbox.insert(
            seq,
            Queued {
                push: Arc::new(stored),
                ..q
            },
        );
    }

    /// Expand explicit ids and a group into distinct recipients, within the limit.
    fn resolve(&self, device_ids: &[String], group: Option<&str>) -> Result<Vec<String>, SendError> {
        let mut targets: Vec<String> = device_ids.to_vec();
        if let Some(g) = group {
            targets.extend(self.group_members(g));
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
    /// `request` (the caller-chosen id's record) is stored with them when any recipient
    /// accepted.
    async fn enqueue_all(
        &self,
        item: &Item,
        targets: &[String],
        request: Option<Op>,
        now: i64,
    ) -> Result<(Vec<RecipientOutcome>, Vec<(String, u64)>), SendError> {
        let mut pending = Vec::with_capacity(targets.len());
        let mut outcomes = Vec::with_capacity(targets.len());
        let mut seqs = Vec::with_capacity(targets.len());
        for device_id in targets {
            let result = match self.device(device_id) {
                // Answered in the response only: nothing is kept, stored or counted per unknown
                // id, so a sender naming junk ids cannot grow the server.
                None => Err("unknown device"),
                Some(device) => {
                    let mut ops = Vec::new();
                    let mut d = device.lock();
                    let result = self.enqueue_locked(&mut d, &mut ops, item, now);
                    pending.push(self.submit(ops));
                    result
                }
            };
            let (state, reason) = match result {
                Ok(seq) => {
                    seqs.push((device_id.clone(), seq));
                    (ReceiptState::Accepted, "")
                }
                Err(reason) => (ReceiptState::Undeliverable, reason),
            };
            outcomes.push(RecipientOutcome {
                device_id: device_id.clone(),
                state,
                reason: reason.into(),
            });
        }
        if let Some(request) = request.filter(|_| !seqs.is_empty()) {
            pending.push(self.submit(vec![request]));
        }
        if let Err(e) = self.settle(pending).await {
            // Not durable: withdraw what is still queued so the sender's retry is the only copy.
            for (device_id, seq) in &seqs {
                if let Some(device) = self.device(device_id) {
                    let mut d = device.lock();
                    if let Some(q) = d.outbox.remove(seq) {
                        let mut ops = Vec::new();
                        self.finish(
                            &mut ops,
                            &q.push,
                            ReceiptState::Undeliverable,
                            "storage failure",
                            now,
                        );
                        self.persist(ops);
                    }
                }
            }
            return Err(e.into());
        }
        Ok((outcomes, seqs))
    }

    /// Queue one item for a locked device. Wakes the session at once when the number is already
    /// durably reserved (the common case); otherwise `settle` does once the reservation is durable.
    fn enqueue_locked(
        &self,
        d: &mut DeviceState,
        ops: &mut Vec<Op>,
        item: &Item,
        now: i64,
    ) -> Result<u64, &'static str> {
        let result = self.try_enqueue_locked(d, ops, item, now);
        if let Err(reason) = result {
            let r = super::receipt(
                &item.id,
                &d.record.device_id,
                ReceiptState::Undeliverable,
                reason,
                "",
                now,
            );
            self.announce(ops, item.kind, r, None);
        }
        result
    }

    fn try_enqueue_locked(
        &self,
        d: &mut DeviceState,
        ops: &mut Vec<Op>,
        item: &Item,
        now: i64,
    ) -> Result<u64, &'static str> {
        if d.record.revoked {
            return Err("device revoked");
        }
        if !item.collapse_key.is_empty() {
            let older: Vec<u64> = d
                .outbox
                .iter()
                .filter(|(_, q)| {
                    q.state == ReceiptState::Accepted && q.push.collapse_key == item.collapse_key
                })
                .map(|(s, _)| *s)
                .collect();
            for seq in older {
                if let Some(q) = d.outbox.remove(&seq) {
                    self.finish(
                        ops,
                        &q.push,
                        ReceiptState::Superseded,
                        "replaced by a newer message with the same collapse key",
                        now,
                    );
                }
            }
        }
        if d.outbox.len() >= self.limits().max_queued_per_device {
            return Err("device queue full");
        }
        reserve_seq(d, ops);
        let seq = d.next_seq;
        d.next_seq += 1;
        let push = Push {
            seq,
            id: item.id.clone(),
            body: Some(item.body.clone()),
        };
        let stored = Arc::new(StoredPush {
            device_id: d.record.device_id.clone(),
            seq,
            id: item.id.clone(),
            kind: item.kind,
            collapse_key: item.collapse_key.clone(),
            expires_at_ms: item.expires,
            encoded: push.encode_to_vec(),
        });
        ops.push(Op::PutPush((*stored).clone()));
        self.receipt(ops, &stored, ReceiptState::Accepted, "", now);
        let earliest = {
            let mut deadlines = self.0.deadlines.lock();
            deadlines.insert((item.expires, stored.device_id.clone(), seq));
            deadlines.first().is_some_and(|(t, ..)| *t == item.expires)
        };
        if earliest {
            self.0.deadlines_changed.notify_one();
        }
        d.outbox.insert(
            seq,
            Queued {
                push: stored,
                state: ReceiptState::Accepted,
                voip: super::fallback::VoipLeg::Idle,
                queued_ms: now,
                restored: false,
                handed: false,
            },
        );
        if seq < d.durable_ceiling
            && let Some(s) = &d.session
        {
            s.ctl.wake();
        }
        Ok(seq)
    }
}

/// One push to fan out.
struct Item {
    id: String,
    kind: PushKind,
    collapse_key: String,
    expires: i64,
    body: push::Body,
}

/// What a caller-chosen id stands for at the moment it is checked.
enum IdUse {
    /// First use: the claim keeps concurrent requests with the same id out until it is dropped.
    New(IdClaim),
    /// The same request again: answer with what it got.
    Same(RequestRecord),
}

/// An id claimed by a request being placed; released on drop.
struct IdClaim {
    hub: Hub,
    id: String,
}

impl Drop for IdClaim {
    fn drop(&mut self) {
        self.hub.0.ids_in_flight.lock().remove(&self.id);
    }
}

impl Hub {
    /// Check a caller-chosen id against what was asked under it (committed state, no barrier:
    /// a retry arrives after its original was answered, and waiting for the store here would
    /// put an fsync in front of every send) and against requests still being placed.
    fn claim_id(&self, id: &str, kind: PushKind, digest: &[u8]) -> Result<IdUse, SendError> {
        let in_use = |what| SendError::IdInUse { id: id.into(), what };
        if let Some(previous) = self.0.store.request(id)? {
            return match (previous.kind == kind, previous.digest == digest) {
                (true, true) => Ok(IdUse::Same(previous)),
                (true, false) => Err(in_use("an earlier request with other content")),
                (false, _) => Err(in_use(match previous.kind {
                    PushKind::CallInvite => "a call",
                    _ => "a message",
                })),
            };
        }
        if !self.0.ids_in_flight.lock().insert(id.to_string()) {
            return Err(in_use("a request still being placed"));
        }
        Ok(IdUse::New(IdClaim {
            hub: self.clone(),
            id: id.into(),
        }))
    }

    /// The answer a repeated request gets: the receipts its pushes have now.
    fn previous_outcome(&self, id: String, previous: &RequestRecord) -> Result<Sent, SendError> {
        let recipients = self.0.store.receipts(&id)?.into_iter().map(outcome_of).collect();
        Ok(Sent {
            id,
            recipients,
            expires_at_ms: previous.expires_at_ms,
        })
    }
}

/// Length-prefixed fields, so that no two different field lists hash alike.
struct Digest(sha2::Sha256);

impl Digest {
    fn new(kind: &str) -> Self {
        let mut d = Self(sha2::Sha256::default());
        d.bytes(kind.as_bytes());
        d
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        use sha2::Digest as _;
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }

    fn targets(&mut self, device_ids: &[String], group: Option<&str>) -> &mut Self {
        let mut ids: Vec<&str> = device_ids.iter().map(String::as_str).collect();
        ids.sort_unstable();
        ids.dedup();
        self.bytes(&(ids.len() as u64).to_le_bytes());
        for id in ids {
            self.bytes(id.as_bytes());
        }
        self.bytes(group.unwrap_or("\0no group").as_bytes())
    }

    fn finish(self) -> Vec<u8> {
        use sha2::Digest as _;
        self.0.finalize().to_vec()
    }
}

/// The content of a message request, as compared when its id is reused.
fn message_digest(req: &MessageRequest) -> Vec<u8> {
    let mut d = Digest::new("message");
    d.targets(&req.device_ids, req.group.as_deref())
        .bytes(req.title.as_bytes())
        .bytes(req.body.as_bytes())
        .bytes(&req.data)
        .bytes(&req.priority.to_le_bytes())
        .bytes(&req.ttl_secs.to_le_bytes())
        .bytes(req.collapse_key.as_bytes())
        .bytes(req.sender.as_bytes());
    d.finish()
}

/// The content of a call request, as compared when its id is reused.
fn call_digest(req: &CallRequest) -> Vec<u8> {
    let mut d = Digest::new("call");
    d.targets(&req.device_ids, req.group.as_deref())
        .bytes(req.caller_name.as_bytes())
        .bytes(req.caller_handle.as_bytes())
        .bytes(&[u8::from(req.video)])
        .bytes(&req.ring_secs.to_le_bytes());
    d.finish()
}

fn outcome_of(r: Receipt) -> RecipientOutcome {
    RecipientOutcome {
        device_id: r.device_id,
        state: r.state,
        reason: r.reason,
    }
}

fn check_id(id: &str) -> Result<(), SendError> {
    if id.len() > 128 || id.contains('#') || id.chars().any(char::is_control) {
        return Err(SendError::Invalid(
            "ids are at most 128 bytes, without '#' or control characters".into(),
        ));
    }
    Ok(())
}
