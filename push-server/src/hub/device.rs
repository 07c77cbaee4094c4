//! One device's delivery state as a pure state machine: decisions in, [`Effects`] out.
//!
//! No locks, no clock, no I/O: every method takes the time it acts at ([`Ctx::now`]) and says
//! what must follow (store ops, receipts, timers, a wake-up, VoIP starts, call-table notes). The
//! hub's driver holds the device's lock around a call and applies the effects before releasing
//! it, so the stored order is the decided order. Tests drive it with virtual time.
//!
//! Invariants kept here:
//! - Sequence numbers strictly increase and are never reused: numbers are handed out below a
//!   durably reserved ceiling only (`durable_ceiling`), reserved a block ahead.
//! - A push leaves the outbox only with a final receipt (acked, expired, superseded, cancelled,
//!   undeliverable) and its store row and timers removed in the same effects.
//! - `Acked` is reported only for a push that may have reached the device (see
//!   [`DeviceCore::ack`] and [`DeviceCore::apply_floor`]).
//! - Only a queued, unacknowledged, unexpired call invite can become a VoIP start.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use apns_bridge::{DeviceToken, VoipCall, VoipOutcome};
use prost::Message as _;
use push_proto::device::{CallCancel, CancelReason, Hello, Push, push};

use super::{
    calls::CalleeNote,
    encoded::{self, EncodedPush},
    timers::{Deadline, Timer, TimerChange},
};
use crate::{
    metrics,
    store::{DeviceRecord, Op, PushKind, Receipt, ReceiptState, StoredPush},
};

/// Sequence numbers reserved per durable ceiling write.
pub(super) const SEQ_BLOCK: u64 = 1024;

/// Sequence numbers stay below 2^53, so they survive a double (Lua, JSON).
pub const MAX_SEQ: u64 = 1 << 53;
/// Floors (`Hello.last_seen_seq`) must be below 2^52, leaving numbering above any accepted
/// floor 2^52 numbers of room below [`MAX_SEQ`].
pub const MAX_FLOOR: u64 = 1 << 52;

/// What a decision needs besides the device: the time, and the hub-wide facts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ctx {
    /// Unix ms the decision is made at.
    pub(super) now: i64,
    /// The store's epoch (see `device.proto`, "Epochs and the floor").
    pub(super) epoch: u64,
    /// The generation of the server's CA (stamped on a registration).
    pub(super) ca_generation: u32,
    /// Whether the APNs VoIP fallback is configured.
    pub(super) voip: bool,
    /// `limits.max_queued_per_device`.
    pub(super) max_queued: usize,
    /// `limits.call_ack_window_ms`.
    pub(super) ack_window_ms: i64,
}

/// One push to fan out, encoded once for all its recipients.
#[derive(Debug, Clone)]
pub(super) struct Item {
    pub(super) id: String,
    pub(super) kind: PushKind,
    pub(super) collapse_key: String,
    pub(super) expires: i64,
    /// The `Push` without its sequence number (see `encoded.rs`).
    pub(super) unnumbered: Arc<[u8]>,
}

impl Item {
    pub(super) fn new(
        id: String,
        kind: PushKind,
        collapse_key: String,
        expires: i64,
        body: push::Body,
    ) -> Self {
        let unnumbered = encoded::unnumbered(&id, body);
        Self {
            id,
            kind,
            collapse_key,
            expires,
            unnumbered,
        }
    }
}

/// Where the VoIP fallback stands for one queued call invite. Moves only forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VoipLeg {
    /// Not attempted.
    Idle,
    /// Restored from the store after a restart; never attempted (a push may have gone out).
    Unknown,
    /// Handed to the bridge, no answer yet.
    Sending,
    /// APNs accepted the push.
    Delivered,
    /// The fallback failed (reported to the sender).
    Failed,
}

impl VoipLeg {
    /// Whether a VoIP push may have reached the device (so a cancel must follow it).
    pub(super) fn may_have_rung(self) -> bool {
        matches!(self, Self::Sending | Self::Delivered)
    }
}

/// A push in the outbox.
#[derive(Debug, Clone)]
pub(super) struct Queued {
    pub(super) push: Arc<StoredPush>,
    pub(super) state: ReceiptState,
    /// Where the APNs VoIP fallback stands for this push (call invites only).
    pub(super) voip: VoipLeg,
    /// When its ack window ends, while one is scheduled (call invites to a live session).
    pub(super) ack_due: Option<i64>,
    /// Unix ms it was queued (the process's start for pushes restored from the store), for
    /// latency figures.
    pub(super) queued_ms: i64,
    /// Loaded from the store at start-up: it may have been written to the device before the
    /// restart, so a trusted floor above it settles it.
    pub(super) restored: bool,
    /// Handed to a session to write (set before the write, so no failed or cut-short write can
    /// leave a push the device saw looking unseen).
    pub(super) handed: bool,
}

/// The device's live session, as the core knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Session {
    pub(super) id: u64,
    pub(super) started_ms: i64,
    /// The device's clock minus ours at its hello, if it reported its clock.
    pub(super) clock_offset_ms: Option<i64>,
}

/// A receipt to announce (broadcast, history, metrics); its store op is already in the effects.
#[derive(Debug, Clone)]
pub(super) struct Announce {
    pub(super) kind: PushKind,
    pub(super) receipt: Receipt,
    /// Time since the push was queued, for delivered and acked receipts.
    pub(super) latency_ms: Option<i64>,
}

/// Hand this invite to the VoIP bridge.
#[derive(Debug)]
pub(super) struct VoipStart {
    pub(super) seq: u64,
    pub(super) call_id: String,
    pub(super) call: VoipCall,
    pub(super) token: DeviceToken,
    pub(super) why: &'static str,
}

/// What the driver must carry out after a decision, in this order: submit `ops` (one batch),
/// apply `timers`, announce `receipts`, note `callees`, wake the session, start `voip`.
#[derive(Debug, Default)]
pub(super) struct Effects {
    pub(super) ops: Vec<Op>,
    pub(super) receipts: Vec<Announce>,
    pub(super) timers: Vec<TimerChange>,
    pub(super) callees: Vec<CalleeNote>,
    pub(super) wake: bool,
    pub(super) voip: Vec<VoipStart>,
}

impl Effects {
    fn receipt(&mut self, push: &StoredPush, state: ReceiptState, reason: &str, path: &str, at: i64) {
        self.announce(
            push.kind,
            receipt(&push.id, &push.device_id, state, reason, path, at),
            None,
        );
    }

    pub(super) fn announce(&mut self, kind: PushKind, receipt: Receipt, latency_ms: Option<i64>) {
        self.ops.push(Op::PutReceipt(receipt.clone()));
        self.receipts.push(Announce {
            kind,
            receipt,
            latency_ms,
        });
    }
}

/// A receipt.
pub(super) fn receipt(
    id: &str,
    device_id: &str,
    state: ReceiptState,
    reason: &str,
    path: &str,
    at: i64,
) -> Receipt {
    Receipt {
        id: id.into(),
        device_id: device_id.into(),
        state,
        reason: reason.into(),
        at_ms: at,
        path: path.into(),
    }
}

/// One device: its registry record, outbox, numbering and session.
#[derive(Debug)]
pub(super) struct DeviceCore {
    pub(super) record: DeviceRecord,
    pub(super) outbox: BTreeMap<u64, Queued>,
    pub(super) next_seq: u64,
    /// Sequence numbers below this may be handed out (reserved, maybe not yet durable).
    pub(super) ceiling: u64,
    /// Sequence numbers below this are durably reserved; only those may reach the device.
    pub(super) durable_ceiling: u64,
    pub(super) session: Option<Session>,
    /// Calls whose invite left the outbox with a final receipt the call did not decide
    /// (revoked, expired, ...), until a while after their ring deadline: the call learns it
    /// through a note that may arrive after the call decided this callee's end itself, and the
    /// invite must not get a second final receipt then.
    ended_invites: HashMap<String, i64>,
}

/// How long past its ring deadline an invite that ended on its own is remembered: longer than
/// a call's decision can take to reach the device (a cluster sweep runs every second).
const ENDED_INVITE_MEMORY_MS: i64 = 60_000;

impl DeviceCore {
    /// A device whose numbers below `ceiling` may have been handed out before.
    pub(super) fn new(record: DeviceRecord, ceiling: u64) -> Self {
        let ceiling = ceiling.max(1);
        Self {
            record,
            outbox: BTreeMap::new(),
            next_seq: ceiling,
            ceiling,
            durable_ceiling: ceiling,
            session: None,
            ended_invites: HashMap::new(),
        }
    }

    /// A fresh registration: no groups, generation 0.
    pub(super) fn registered(device_id: &str, now: i64) -> Self {
        Self::new(
            DeviceRecord {
                device_id: device_id.into(),
                groups: Vec::new(),
                created_at_ms: now,
                credential_generation: 0,
                revoked: false,
                last_seen_ms: 0,
                last_ssid: String::new(),
                last_disconnect_reason: String::new(),
                sdk_version: String::new(),
                voip_token: String::new(),
                voip_token_invalid: false,
                ca_generation: 0,
            },
            1,
        )
    }

    /// Put back a push loaded from the store at start-up; returns its expiry timer.
    pub(super) fn restore(&mut self, push: StoredPush, now: i64) -> TimerChange {
        // Never hand out a number at or below one already queued, even if the ceiling lags.
        if push.seq >= self.next_seq {
            self.next_seq = push.seq + 1;
            self.ceiling = self.next_seq;
            self.durable_ceiling = self.next_seq;
        }
        let timer = TimerChange::Add(
            push.expires_at_ms,
            Timer::Expire,
            push.device_id.clone(),
            push.seq,
        );
        self.outbox.insert(
            push.seq,
            Queued {
                push: Arc::new(push),
                state: ReceiptState::Accepted,
                // Whether a VoIP push went out before the restart is unknown: send none.
                voip: VoipLeg::Unknown,
                ack_due: None,
                queued_ms: now,
                restored: true,
                handed: false,
            },
        );
        timer
    }

    /// Whether `session_id` is the device's live session.
    pub(super) fn is_session(&self, session_id: u64) -> bool {
        self.session.is_some_and(|s| s.id == session_id)
    }

    /// Reserve the next block of sequence numbers ahead of need: once fewer than half a block is
    /// left below the ceiling. The reservation is durable a commit later, so pushes to a device
    /// with a live session normally find their number durable already and go out at once.
    pub(super) fn reserve_seq(&mut self, fx: &mut Effects) {
        if self.next_seq + SEQ_BLOCK / 2 >= self.ceiling {
            self.ceiling = self.ceiling.max(self.next_seq) + SEQ_BLOCK;
            fx.ops.push(Op::PutSeqCeiling {
                device_id: self.record.device_id.clone(),
                ceiling: self.ceiling,
            });
        }
    }

    /// Numbers below `ceiling` are now durably reserved; returns whether the session should pull.
    pub(super) fn reserved_durably(&mut self, ceiling: u64) -> bool {
        if self.durable_ceiling >= ceiling {
            return false;
        }
        self.durable_ceiling = ceiling;
        self.session.is_some()
    }

    /// The batch reserving numbers below `ceiling` failed: reserve again with the next push
    /// (numbers already handed out in memory are never reused: numbering continues from
    /// `next_seq`).
    pub(super) fn reservation_failed(&mut self, ceiling: u64) {
        if self.ceiling == ceiling {
            self.ceiling = self.durable_ceiling;
        }
    }

    /// Queue one item. On refusal the sender's undeliverable receipt is in the effects.
    pub(super) fn enqueue(&mut self, fx: &mut Effects, cx: Ctx, item: &Item) -> Result<u64, &'static str> {
        let result = self.try_enqueue(fx, cx, item);
        if let Err(reason) = result {
            let r = receipt(
                &item.id,
                &self.record.device_id,
                ReceiptState::Undeliverable,
                reason,
                "",
                cx.now,
            );
            fx.announce(item.kind, r, None);
        }
        result
    }

    fn try_enqueue(&mut self, fx: &mut Effects, cx: Ctx, item: &Item) -> Result<u64, &'static str> {
        if self.record.revoked {
            return Err("device revoked");
        }
        if !item.collapse_key.is_empty() {
            let older: Vec<u64> = self
                .outbox
                .iter()
                .filter(|(_, q)| {
                    q.state == ReceiptState::Accepted && q.push.collapse_key == item.collapse_key
                })
                .map(|(s, _)| *s)
                .collect();
            for seq in older {
                self.finish(
                    fx,
                    seq,
                    ReceiptState::Superseded,
                    "replaced by a newer message with the same collapse key",
                    cx.now,
                );
            }
        }
        if self.outbox.len() >= cx.max_queued {
            return Err("device queue full");
        }
        self.reserve_seq(fx);
        let seq = self.next_seq;
        self.next_seq += 1;
        let stored = Arc::new(StoredPush {
            device_id: self.record.device_id.clone(),
            seq,
            id: item.id.clone(),
            kind: item.kind,
            collapse_key: item.collapse_key.clone(),
            expires_at_ms: item.expires,
            encoded: encoded::numbered(seq, &item.unnumbered),
        });
        fx.ops.push(Op::PutPush((*stored).clone()));
        fx.receipt(&stored, ReceiptState::Accepted, "", "", cx.now);
        fx.timers.push(TimerChange::Add(
            item.expires,
            Timer::Expire,
            stored.device_id.clone(),
            seq,
        ));
        self.outbox.insert(
            seq,
            Queued {
                push: stored,
                state: ReceiptState::Accepted,
                voip: VoipLeg::Idle,
                ack_due: None,
                queued_ms: cx.now,
                restored: false,
                handed: false,
            },
        );
        // A number not yet durable goes out once its reservation is (`reserved_durably`).
        fx.wake |= seq < self.durable_ceiling && self.session.is_some();
        Ok(seq)
    }

    /// Pushes for session `session_id` to write: above `after_seq`, unexpired, durably
    /// numbered, at most `max`; each is marked handed. Empty for any other session.
    pub(super) fn take(&mut self, session_id: u64, after_seq: u64, max: usize, now: i64) -> Vec<EncodedPush> {
        if !self.is_session(session_id) {
            return Vec::new();
        }
        // `after_seq` comes from the peer (its floor): any value must be harmless here.
        let start = after_seq.saturating_add(1);
        if start >= self.durable_ceiling {
            return Vec::new();
        }
        self.outbox
            .range_mut(start..self.durable_ceiling)
            .filter(|(_, q)| q.push.expires_at_ms > now)
            .take(max)
            .map(|(_, q)| {
                q.handed = true;
                EncodedPush::new(q.push.clone())
            })
            .collect()
    }

    /// The session wrote and flushed these pushes.
    pub(super) fn mark_delivered(&mut self, fx: &mut Effects, cx: Ctx, seqs: &[u64]) {
        for seq in seqs {
            if let Some(q) = self
                .outbox
                .get_mut(seq)
                .filter(|q| q.state == ReceiptState::Accepted)
            {
                q.state = ReceiptState::Delivered;
                let r = receipt(
                    &q.push.id,
                    &q.push.device_id,
                    ReceiptState::Delivered,
                    "",
                    "local",
                    cx.now,
                );
                fx.announce(q.push.kind, r, Some(cx.now - q.queued_ms));
            }
        }
    }

    /// Settle what the device acknowledged: everything up to `up_to` and each of `seqs`.
    /// `written_only`: an `Ack` frame can only acknowledge pushes handed to a session of the
    /// device (a push never handed out cannot have been seen, so an ack naming it is foreign or
    /// forged and must not become an ACKED receipt).
    pub(super) fn ack(
        &mut self,
        fx: &mut Effects,
        cx: Ctx,
        (up_to, seqs): (u64, &[u64]),
        written_only: bool,
    ) {
        let eligible = |q: &Queued| !written_only || q.handed;
        let mut acked: Vec<u64> = self
            .outbox
            .range(..=up_to)
            .filter(|(_, q)| eligible(q))
            .map(|(s, _)| *s)
            .collect();
        acked.extend(seqs.iter().filter(|s| self.outbox.get(s).is_some_and(eligible)));
        acked.sort_unstable();
        acked.dedup();
        for seq in acked {
            let Some(q) = self.outbox.remove(&seq) else {
                continue;
            };
            if q.push.kind == PushKind::CallInvite {
                // The ack can beat `place_call` recording its callees: note it, so a cancel
                // still reaches this phone.
                fx.callees.push(CalleeNote {
                    call_id: q.push.id.clone(),
                    seq,
                    acked: true,
                    gone: None,
                });
            }
            let r = receipt(
                &q.push.id,
                &q.push.device_id,
                ReceiptState::Acked,
                "",
                "local",
                cx.now,
            );
            fx.announce(q.push.kind, r, Some(cx.now - q.queued_ms));
            forget(fx, &q);
        }
    }

    /// Apply the floor a device reported in its hello (the rule is in `device.proto`, "Epochs
    /// and the floor"). Numbered by this store and below what it handed out: the floor is the
    /// device's cumulative acknowledgement. Otherwise (another epoch, a new install, a floor
    /// ahead of the server) it acknowledges nothing: queued pushes at or below it are renumbered
    /// above it, so they still reach the app, and numbering continues above it.
    pub(super) fn apply_floor(&mut self, fx: &mut Effects, cx: Ctx, floor: u64, epoch: u64) {
        // The session core refuses larger floors; clamp so no caller can push the counter up.
        let floor = floor.min(MAX_FLOOR - 1);
        let trusted = epoch == cx.epoch && floor < self.next_seq;
        if !trusted {
            self.next_seq = self.next_seq.max(floor + 1);
        }
        // Even a trusted floor settles only what may have reached the device: handed to one of
        // its sessions in this process, or restored from the store (written before a restart,
        // perhaps). A push below it that cannot have been seen moves above it.
        let (mut seen, mut unseen) = (Vec::new(), Vec::new());
        for (seq, q) in self.outbox.range(..=floor) {
            if trusted && (q.handed || q.restored) {
                seen.push(*seq);
            } else {
                unseen.push(*seq);
            }
        }
        self.ack(fx, cx, (0, &seen), false);
        for old in unseen {
            self.renumber(fx, cx, old);
        }
    }

    /// Give queued push `old` the device's next sequence number (same id, same deadline).
    fn renumber(&mut self, fx: &mut Effects, cx: Ctx, old: u64) {
        let Some(q) = self.outbox.remove(&old) else { return };
        let seq = self.next_seq;
        self.next_seq += 1;
        let device_id = self.record.device_id.clone();
        forget(fx, &q);
        let mut stored = (*q.push).clone();
        match Push::decode(&stored.encoded[..]) {
            Ok(mut push) => {
                push.seq = seq;
                stored.encoded = push.encode_to_vec();
                stored.seq = seq;
            }
            Err(e) => {
                tracing::error!(device = %device_id, seq = old, error = %e, "undecodable queued push dropped");
                fx.receipt(
                    &q.push,
                    ReceiptState::Undeliverable,
                    "corrupt stored push",
                    "",
                    cx.now,
                );
                return;
            }
        }
        if stored.kind == PushKind::CallInvite {
            fx.callees.push(CalleeNote {
                call_id: stored.id.clone(),
                seq,
                acked: false,
                gone: None,
            });
        }
        fx.timers.push(TimerChange::Add(
            stored.expires_at_ms,
            Timer::Expire,
            device_id.clone(),
            seq,
        ));
        if let Some(due) = q.ack_due {
            fx.timers
                .push(TimerChange::Add(due, Timer::AckWindow, device_id, seq));
        }
        fx.ops.push(Op::PutPush(stored.clone()));
        self.outbox.insert(
            seq,
            Queued {
                push: Arc::new(stored),
                ..q
            },
        );
    }

    /// Admit session `id`, replacing any older one (returned, to be told to go), and apply the
    /// hello. Returns the replaced session and how many pushes wait for replay.
    pub(super) fn login(
        &mut self,
        fx: &mut Effects,
        cx: Ctx,
        id: u64,
        hello: &Hello,
    ) -> (Option<Session>, u32) {
        let old = self.session.replace(Session {
            id,
            started_ms: cx.now,
            clock_offset_ms: (hello.device_time_ms != 0).then(|| hello.device_time_ms.saturating_sub(cx.now)),
        });
        self.apply_floor(fx, cx, hello.last_seen_seq, hello.epoch);
        // A block ahead (after a restart the counter sits at the ceiling): durable a commit after
        // the login, so the session's first pushes do not wait for one.
        self.reserve_seq(fx);
        self.record.last_seen_ms = cx.now;
        self.record.last_ssid = hello.ssid.clone();
        self.record.sdk_version = hello.sdk_version.clone();
        fx.ops.push(Op::PutDevice(self.record.clone()));
        let replay = self
            .outbox
            .values()
            .filter(|q| q.push.expires_at_ms > cx.now)
            .count();
        (old, replay as u32)
    }

    /// Session `id` ended; false (nothing changed) if it is not the live session.
    pub(super) fn logout(&mut self, fx: &mut Effects, cx: Ctx, id: u64, reason: &str) -> bool {
        if !self.is_session(id) {
            return false;
        }
        self.end_session(fx, cx, reason);
        fx.ops.push(Op::PutDevice(self.record.clone()));
        true
    }

    /// Clear the live session (if any) for `reason`: calls it was ringing need the other path.
    /// The caller persists the record.
    fn end_session(&mut self, fx: &mut Effects, cx: Ctx, reason: &str) -> Option<Session> {
        let ended = self.session.take()?;
        self.record.last_seen_ms = cx.now;
        self.record.last_disconnect_reason = reason.into();
        self.voip_on_logout(fx, cx);
        Some(ended)
    }

    /// Set the groups; for a device registered before, move to a new credential generation
    /// (every credential issued before stops working, a revoked device becomes usable again, a
    /// live session ends). Returns the old groups and the ended session.
    pub(super) fn register(
        &mut self,
        fx: &mut Effects,
        cx: Ctx,
        groups: Vec<String>,
        existed: bool,
    ) -> (Vec<String>, Option<Session>) {
        let old = std::mem::replace(&mut self.record.groups, groups);
        // The credential about to be issued goes with an enrollment of this CA's pins.
        self.record.ca_generation = cx.ca_generation;
        let mut ended = None;
        if existed {
            self.record.revoked = false;
            self.record.credential_generation += 1;
            ended = self.end_session(fx, cx, "credential re-issued");
        }
        fx.ops.push(Op::PutDevice(self.record.clone()));
        // Numbers for the first pushes, durable before the device can even log in.
        self.reserve_seq(fx);
        (old, ended)
    }

    /// Revoke every credential: the queue is reported undeliverable, the session ends.
    pub(super) fn revoke(&mut self, fx: &mut Effects, cx: Ctx) -> Option<Session> {
        self.record.revoked = true;
        self.record.credential_generation += 1;
        let seqs: Vec<u64> = self.outbox.keys().copied().collect();
        for seq in seqs {
            self.finish(fx, seq, ReceiptState::Undeliverable, "device revoked", cx.now);
        }
        let ended = self.end_session(fx, cx, "credential revoked");
        fx.ops.push(Op::PutDevice(self.record.clone()));
        ended
    }

    /// The expiry timer of push `seq` fired.
    pub(super) fn expire(&mut self, fx: &mut Effects, cx: Ctx, seq: u64) {
        let Some(kind) = self.outbox.get(&seq).map(|q| q.push.kind) else {
            return;
        };
        let reason = match kind {
            PushKind::Message => "ttl elapsed before the device acknowledged it",
            PushKind::CallInvite => "ring deadline passed before the device acknowledged the call",
            PushKind::CallCancel => "call over",
        };
        self.finish_queued(fx, seq, ReceiptState::Expired, reason, cx.now);
    }

    /// The call `call_id` was cancelled: withdraw its invite `seq` if still queued. Returns
    /// whether the invite may have reached the device (so a cancel must follow): written to a
    /// session, rung through APNs, or `acked` before.
    pub(super) fn withdraw_invite(
        &mut self,
        fx: &mut Effects,
        cx: Ctx,
        seq: u64,
        call_id: &str,
        acked: bool,
    ) -> bool {
        let Some(q) = self.outbox.get(&seq).filter(|q| q.push.id == call_id) else {
            return acked;
        };
        // A phone rung through APNs gets the cancel locally if it comes on-site in time; a
        // cancel never goes as a VoIP push.
        let reached = q.state == ReceiptState::Delivered || q.voip.may_have_rung();
        self.finish_queued(fx, seq, ReceiptState::Cancelled, "call cancelled", cx.now);
        reached
    }

    /// Cluster mode: call `call_id` was cancelled on another node, which knows the callees but
    /// not their invites. Withdraw the invite if queued; returns whether a cancel must follow
    /// (the invite may have rung, or is no longer queued: acknowledged, perhaps on a node that
    /// held the device before; a cancel for a call the phone never heard of is ignored there).
    pub(super) fn withdraw_call(&mut self, fx: &mut Effects, cx: Ctx, call_id: &str) -> bool {
        let invite = self
            .outbox
            .iter()
            .find(|(_, q)| q.push.kind == PushKind::CallInvite && q.push.id == call_id)
            .map(|(seq, _)| *seq);
        match invite {
            Some(seq) => self.withdraw_invite(fx, cx, seq, call_id, false),
            None => true,
        }
    }

    /// Every timer this device's outbox holds (to drop them with the device).
    pub(super) fn timers(&self) -> impl Iterator<Item = Deadline> + '_ {
        self.outbox.values().flat_map(|q| {
            let (d, s) = (&q.push.device_id, q.push.seq);
            let ack = q.ack_due.map(|at| (at, Timer::AckWindow, d.clone(), s));
            std::iter::once((q.push.expires_at_ms, Timer::Expire, d.clone(), s)).chain(ack)
        })
    }

    /// Push `seq` could not be stored: withdraw it, so the sender's retry is the only copy.
    pub(super) fn withdraw_unstored(&mut self, fx: &mut Effects, cx: Ctx, seq: u64) {
        self.finish(fx, seq, ReceiptState::Undeliverable, "storage failure", cx.now);
    }

    /// Remove push `seq` with a final receipt.
    fn finish(&mut self, fx: &mut Effects, seq: u64, state: ReceiptState, reason: &str, now: i64) {
        debug_assert!(state.is_final());
        if let Some(q) = self.outbox.remove(&seq) {
            fx.receipt(&q.push, state, reason, "", now);
            self.invite_ended(fx, &q, state, now);
            forget(fx, &q);
        }
    }

    /// Like [`DeviceCore::finish`]; a call that rang through APNs says so in its final receipt.
    fn finish_queued(&mut self, fx: &mut Effects, seq: u64, state: ReceiptState, reason: &str, now: i64) {
        debug_assert!(state.is_final());
        if let Some(q) = self.outbox.remove(&seq) {
            let path = if q.voip == VoipLeg::Delivered { "apns" } else { "" };
            fx.receipt(&q.push, state, reason, path, now);
            self.invite_ended(fx, &q, state, now);
            forget(fx, &q);
        }
    }

    /// A call invite left the outbox with a final state the call did not decide: tell the
    /// call, and remember it (see `ended_invites`).
    fn invite_ended(&mut self, fx: &mut Effects, q: &Queued, state: ReceiptState, now: i64) {
        if q.push.kind != PushKind::CallInvite {
            return;
        }
        self.ended_invites
            .retain(|_, deadline| *deadline + ENDED_INVITE_MEMORY_MS > now);
        self.ended_invites.insert(q.push.id.clone(), q.push.expires_at_ms);
        fx.callees.push(CalleeNote {
            call_id: q.push.id.clone(),
            seq: q.push.seq,
            acked: false,
            gone: Some(state),
        });
    }

    /// The call decided this callee's ring is over (see `calls::CallFx`): withdraw the invite of
    /// `call_id` if still queued, and report `state` (`ring_out`: MISSED if the invite may have
    /// rung, EXPIRED if it never reached the phone). If it may have rung, queue `cancel`;
    /// returns whether a cancel was queued.
    pub(super) fn stop_ringing(
        &mut self,
        fx: &mut Effects,
        cx: Ctx,
        call_id: &str,
        state: StopState,
        detail: &str,
        cancel: Option<&Item>,
    ) -> bool {
        let queued = self
            .outbox
            .iter()
            .find(|(_, q)| q.push.kind == PushKind::CallInvite && q.push.id == call_id)
            .map(|(seq, _)| *seq);
        // Ended on its own (revoked, expired): its final receipt is out, the call will hear.
        if queued.is_none() && self.ended_invites.contains_key(call_id) {
            return false;
        }
        // Not queued: acknowledged (it rang), perhaps on the node that held the device before.
        let (reached, path) = match queued.and_then(|seq| self.outbox.remove(&seq)) {
            Some(q) => {
                forget(fx, &q);
                let apns = q.voip == VoipLeg::Delivered;
                let reached = q.handed || q.state == ReceiptState::Delivered || q.voip.may_have_rung();
                (
                    reached,
                    if apns {
                        "apns"
                    } else if reached {
                        "local"
                    } else {
                        ""
                    },
                )
            }
            None => (true, "local"),
        };
        let state = match state {
            StopState::Is(s) => s,
            StopState::RingOut if reached => ReceiptState::Missed,
            StopState::RingOut => ReceiptState::Expired,
        };
        let detail = if state == ReceiptState::Expired {
            "ring deadline passed before the device acknowledged the call"
        } else {
            detail
        };
        let r = receipt(call_id, &self.record.device_id, state, detail, path, cx.now);
        fx.announce(PushKind::CallInvite, r, None);
        // A full queue or a revoked device says why in the cancel's own receipt.
        reached && cancel.is_some_and(|cancel| self.enqueue(fx, cx, cancel).is_ok())
    }

    // ---- The APNs VoIP fallback (policy in `fallback.rs`) ----

    /// A call's invite `seq` is durable: without a session it rings through APNs now; with one,
    /// once its ack window ends unacknowledged.
    pub(super) fn plan_voip(&mut self, fx: &mut Effects, cx: Ctx, seq: u64) {
        if !cx.voip {
            return;
        }
        if self.session.is_none() {
            self.start_voip(fx, cx, seq, "no live session");
        } else if self.voip_token().is_some()
            && let Some(q) = self.outbox.get_mut(&seq)
        {
            let due = cx.now + cx.ack_window_ms;
            q.ack_due = Some(due);
            fx.timers.push(TimerChange::Add(
                due,
                Timer::AckWindow,
                self.record.device_id.clone(),
                seq,
            ));
        }
    }

    /// The ack window of invite `seq` ended.
    pub(super) fn ack_window_ended(&mut self, fx: &mut Effects, cx: Ctx, seq: u64) {
        if let Some(q) = self.outbox.get_mut(&seq) {
            q.ack_due = None;
        }
        self.start_voip(fx, cx, seq, "invite not acknowledged within the ack window");
    }

    /// The session ended: unacknowledged invites go to APNs now, not at the end of their windows.
    fn voip_on_logout(&mut self, fx: &mut Effects, cx: Ctx) {
        if !cx.voip {
            return;
        }
        let invites: Vec<u64> = self
            .outbox
            .iter()
            .filter(|(_, q)| q.push.kind == PushKind::CallInvite && q.voip == VoipLeg::Idle)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in invites {
            self.start_voip(fx, cx, seq, "session ended");
        }
    }

    /// The device's usable PushKit token, if any.
    fn voip_token(&self) -> Option<DeviceToken> {
        let r = &self.record;
        if r.revoked || r.voip_token_invalid || r.voip_token.is_empty() {
            return None;
        }
        DeviceToken::parse(&r.voip_token).ok()
    }

    /// Start the VoIP leg of invite `seq`, if it still rings, has not been tried, and the device
    /// has a usable token.
    pub(super) fn start_voip(&mut self, fx: &mut Effects, cx: Ctx, seq: u64, why: &'static str) {
        if !cx.voip {
            return;
        }
        let Some(token) = self.voip_token() else {
            return;
        };
        let device_id = &self.record.device_id;
        // Acked, cancelled or expired invites are gone from the outbox: nothing to ring.
        let Some(q) = self.outbox.get_mut(&seq) else {
            return;
        };
        if q.push.kind != PushKind::CallInvite {
            // The one place a non-call could reach the bridge: stop it, and make it visible.
            tracing::error!(device = %device_id, seq, kind = ?q.push.kind, "non-call push stopped at the VoIP gate");
            metrics::voip_non_call();
            return;
        }
        if q.voip != VoipLeg::Idle || q.push.expires_at_ms <= cx.now {
            return;
        }
        if let Some(due) = q.ack_due.take() {
            fx.timers
                .push(TimerChange::Remove(due, Timer::AckWindow, device_id.clone(), seq));
        }
        let call = match Push::decode(&q.push.encoded[..]) {
            Ok(Push {
                body: Some(push::Body::CallInvite(invite)),
                ..
            }) => VoipCall::from_invite(invite).map_err(|e| e.to_string()),
            _ => Err("queued call invite does not decode".into()),
        };
        match call {
            Ok(call) => {
                q.voip = VoipLeg::Sending;
                fx.voip.push(VoipStart {
                    seq,
                    call_id: q.push.id.clone(),
                    call,
                    token,
                    why,
                });
            }
            Err(e) => {
                tracing::error!(device = %device_id, seq, error = %e, "call invite breaks the VoIP contract; no VoIP fallback");
                q.voip = VoipLeg::Failed;
            }
        }
    }

    /// Apply the bridge's answer for invite `seq` of call `call_id`.
    pub(super) fn voip_result(
        &mut self,
        fx: &mut Effects,
        cx: Ctx,
        (seq, call_id): (u64, &str),
        token: &DeviceToken,
        outcome: VoipOutcome,
    ) {
        let failure = match outcome {
            VoipOutcome::Delivered { .. } => {
                if let Some(q) = self.outbox.get_mut(&seq).filter(|q| q.push.id == call_id) {
                    q.voip = VoipLeg::Delivered;
                    let r = receipt(
                        &q.push.id,
                        &q.push.device_id,
                        ReceiptState::Delivered,
                        "",
                        "apns",
                        cx.now,
                    );
                    fx.announce(q.push.kind, r, Some(cx.now - q.queued_ms));
                }
                None
            }
            VoipOutcome::TokenInvalid { status, reason } => {
                let r = &mut self.record;
                if r.voip_token == token.as_str() && !r.voip_token_invalid {
                    r.voip_token_invalid = true;
                    fx.ops.push(Op::PutDevice(r.clone()));
                    tracing::warn!(device = %r.device_id, %token, status, %reason, "VoIP token invalidated");
                }
                Some(format!(
                    "APNs refused the device's VoIP token ({status} {reason}); token invalidated"
                ))
            }
            VoipOutcome::Undeliverable { reason, .. } => Some(format!("APNs fallback failed: {reason}")),
            VoipOutcome::Rejected { reason } => Some(format!("APNs fallback refused: {reason}")),
            VoipOutcome::Duplicate => None,
        };
        if let Some(reason) = failure
            && let Some(q) = self.outbox.get_mut(&seq).filter(|q| q.push.id == call_id)
        {
            q.voip = VoipLeg::Failed;
            // Report the failed leg and keep the invite queued: a phone that comes back on-site
            // before the ring deadline still rings (with no internet on site, APNs always fails).
            let path = if q.state == ReceiptState::Delivered {
                "local"
            } else {
                ""
            };
            let r = receipt(&q.push.id, &q.push.device_id, q.state, &reason, path, cx.now);
            fx.announce(q.push.kind, r, None);
        }
    }

    /// Set (`Some`) or clear (`None`) the PushKit token; false when nothing changed. A new token
    /// is valid until APNs says otherwise.
    pub(super) fn set_token(&mut self, fx: &mut Effects, token: Option<DeviceToken>) -> bool {
        let token = token.map(|t| t.as_str().to_string()).unwrap_or_default();
        if self.record.voip_token == token && !self.record.voip_token_invalid {
            return false;
        }
        self.record.voip_token = token;
        self.record.voip_token_invalid = false;
        fx.ops.push(Op::PutDevice(self.record.clone()));
        true
    }

    /// The live session reports a new SSID.
    pub(super) fn network_changed(&mut self, fx: &mut Effects, cx: Ctx, ssid: &str) {
        self.record.last_ssid = ssid.into();
        self.record.last_seen_ms = cx.now;
        fx.ops.push(Op::PutDevice(self.record.clone()));
    }
}

/// A push left the outbox: drop its store row and its timers.
/// What [`DeviceCore::stop_ringing`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopState {
    /// This state.
    Is(ReceiptState),
    /// The ring deadline: MISSED if it may have rung, EXPIRED if not.
    RingOut,
}

/// The cancel of call `call_id`, living until `expires`.
pub(super) fn cancel_item(call_id: &str, uuid: &str, expires: i64, reason: CancelReason) -> Item {
    Item::new(
        format!("{call_id}#cancel"),
        PushKind::CallCancel,
        String::new(),
        expires,
        push::Body::CallCancel(CallCancel {
            call_id: call_id.into(),
            call_uuid: uuid.into(),
            reason: reason as i32,
        }),
    )
}

fn forget(fx: &mut Effects, q: &Queued) {
    let (device_id, seq) = (q.push.device_id.clone(), q.push.seq);
    fx.ops.push(Op::DeletePush {
        device_id: device_id.clone(),
        seq,
    });
    if let Some(due) = q.ack_due {
        fx.timers
            .push(TimerChange::Remove(due, Timer::AckWindow, device_id.clone(), seq));
    }
    fx.timers.push(TimerChange::Remove(
        q.push.expires_at_ms,
        Timer::Expire,
        device_id,
        seq,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        Ctx {
            now: 1_000,
            epoch: 7,
            ca_generation: 0,
            voip: false,
            max_queued: 100,
            ack_window_ms: 3_000,
        }
    }

    fn message(id: &str) -> Item {
        Item::new(
            id.into(),
            PushKind::Message,
            String::new(),
            60_000,
            push::Body::Message(Default::default()),
        )
    }

    fn invite(call_id: &str) -> Item {
        Item::new(
            call_id.into(),
            PushKind::CallInvite,
            String::new(),
            30_000,
            push::Body::CallInvite(Default::default()),
        )
    }

    fn ceilings(fx: &Effects) -> Vec<u64> {
        fx.ops
            .iter()
            .filter_map(|op| match op {
                Op::PutSeqCeiling { ceiling, .. } => Some(*ceiling),
                _ => None,
            })
            .collect()
    }

    /// Regression (found by `delivery_invariants_hold_for_any_operations` under load): a
    /// callee revoked mid-ring got UNDELIVERABLE, and then MISSED when the call's deadline was
    /// decided before the call heard of the revocation (the note is applied by a task of its
    /// own; in a cluster, on another node). One invite, two final receipts.
    #[test]
    fn an_invite_that_ended_on_its_own_gets_no_second_final_receipt_from_its_call() {
        let mut core = DeviceCore::registered("d0", 0);
        let mut fx = Effects::default();
        core.enqueue(&mut fx, ctx(), &invite("call-1")).expect("queued");
        let mut fx = Effects::default();
        core.revoke(&mut fx, ctx());
        let finals = |fx: &Effects| -> Vec<ReceiptState> {
            fx.receipts
                .iter()
                .map(|a| a.receipt.state)
                .filter(|s| s.is_final())
                .collect()
        };
        assert_eq!(finals(&fx), [ReceiptState::Undeliverable]);
        assert!(matches!(
            fx.callees[..],
            [CalleeNote {
                gone: Some(ReceiptState::Undeliverable),
                ..
            }]
        ));

        let at_deadline = Ctx { now: 30_000, ..ctx() };
        for state in [StopState::RingOut, StopState::Is(ReceiptState::Missed)] {
            let mut fx = Effects::default();
            core.stop_ringing(&mut fx, at_deadline, "call-1", state, "ring deadline", None);
            assert_eq!(finals(&fx), [], "the invite had its final receipt");
        }
        // An invite acknowledged (it rang) still gets its call's outcome.
        let mut fx = Effects::default();
        let rang = invite("call-2");
        let mut other = DeviceCore::registered("d1", 0);
        let seq = other.enqueue(&mut fx, ctx(), &rang).expect("queued");
        other.ack(&mut fx, ctx(), (seq, &[]), false);
        let mut fx = Effects::default();
        other.stop_ringing(&mut fx, at_deadline, "call-2", StopState::RingOut, "", None);
        assert_eq!(finals(&fx), [ReceiptState::Missed]);
    }

    #[test]
    fn a_reservation_whose_batch_failed_is_made_again_and_no_number_is_reused() {
        let mut core = DeviceCore::registered("d0", 0);
        let mut fx = Effects::default();
        let first = core.enqueue(&mut fx, ctx(), &message("m1")).expect("queued");
        let reserved = ceilings(&fx);
        assert_eq!(reserved, vec![1 + SEQ_BLOCK]);
        // The batch carrying the reservation failed: the next push must reserve again, or its
        // number would never become durable and never go out.
        core.reservation_failed(reserved[0]);
        let mut fx = Effects::default();
        let second = core.enqueue(&mut fx, ctx(), &message("m2")).expect("queued");
        assert_eq!(ceilings(&fx).len(), 1, "reserved again");
        assert!(second > first, "numbering continues");
        core.reserved_durably(ceilings(&fx)[0]);
        assert!(core.durable_ceiling > second, "the second push can go out");
    }
}
