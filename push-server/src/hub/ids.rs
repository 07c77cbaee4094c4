//! Caller-chosen ids: a retry of the same request is answered with what it got, any other reuse
//! is refused, whatever kind used the id first.

use super::{
    Hub,
    senders::{CallRequest, MessageRequest, RecipientOutcome, SendError, Sent},
};
use crate::store::{PushKind, Receipt, RequestRecord};

/// What a caller-chosen id stands for at the moment it is checked.
pub(super) enum IdUse {
    /// First use: the claim keeps concurrent requests with the same id out until it is dropped.
    New(IdClaim),
    /// The same request again: answer with what it got.
    Same(RequestRecord),
}

/// An id claimed by a request being placed; released on drop.
pub(super) struct IdClaim {
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
    pub(super) fn claim_id(&self, id: &str, kind: PushKind, digest: &[u8]) -> Result<IdUse, SendError> {
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
    pub(super) fn previous_outcome(&self, id: String, previous: &RequestRecord) -> Result<Sent, SendError> {
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
pub(super) fn message_digest(req: &MessageRequest) -> Vec<u8> {
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
pub(super) fn call_digest(req: &CallRequest) -> Vec<u8> {
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

pub(super) fn check_id(id: &str, max_bytes: usize) -> Result<(), SendError> {
    if id.len() > max_bytes || id.contains('#') || id.chars().any(char::is_control) {
        return Err(SendError::Invalid(format!(
            "ids are at most {max_bytes} bytes, without '#' or control characters"
        )));
    }
    Ok(())
}
