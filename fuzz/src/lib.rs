//! What the stateful targets share: a real `RedbStore` and `Hub` in a scratch directory.

use std::{path::Path, sync::Arc};

use push_server::{
    api::keys::{Holder, Keys, NewKey},
    config::Limits,
    hub::{Hub, SystemClock},
    store::{RedbStore, Store},
};

/// A scratch directory, in memory when the machine has `/dev/shm`: the store syncs every
/// commit, and on a disk that would cap a target at a few hundred executions per second.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new().prefix("lpush-fuzz").tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().expect("a temporary directory")
}

/// A hub over a fresh store in `dir`, as `Server::start` builds it (no VoIP fallback).
pub fn hub_in(dir: &Path, limits: Limits) -> (Hub, Arc<RedbStore>) {
    let store = Arc::new(RedbStore::open(&dir.join("push.redb")).expect("store opens"));
    let snapshot = store.load().expect("store loads");
    let hub = Hub::new(store.clone(), limits, snapshot, None, Arc::new(SystemClock));
    (hub, store)
}

/// An authenticated admin key made in `store`, for targets that act as an admin.
pub fn admin_in(rt: &tokio::runtime::Runtime, store: Arc<RedbStore>) -> Holder {
    let keys = Keys::new(store, &Limits::default());
    rt.block_on(async {
        let new = NewKey {
            name: "fuzz-admin".into(),
            scopes: vec!["admin".into()],
            valid_days: 0,
            enroll_groups: Vec::new(),
        };
        let (key, _) = keys.create(new).await?;
        keys.authenticate(&key)
    })
    .expect("an admin key")
}

/// A current-thread runtime, as the hub needs one for the tasks it spawns.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

/// A stateful target's input read as a script: a tag byte per step, then that step's
/// arguments. Running out of bytes reads zeros and empties, so every input is a valid script,
/// and the seed writer (`tests/seeds.rs`) can record a real exchange in the same format,
/// which `arbitrary`'s encoding does not allow.
pub struct Script<'a>(&'a [u8]);

impl<'a> Script<'a> {
    /// A script over a target's input.
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    /// A little-endian i64.
    pub fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take())
    }

    /// A u16 length, then that many bytes (or what is left).
    pub fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16()).min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    /// [`Self::bytes`] as text (invalid UTF-8 replaced).
    pub fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }

    /// A count byte, then that many u64.
    pub fn seqs(&mut self) -> Vec<u64> {
        (0..self.u8()).map(|_| self.u64()).collect()
    }
}

/// Writes what [`Script`] reads, for seeds.
#[derive(Default)]
pub struct ScriptWriter(pub Vec<u8>);

impl ScriptWriter {
    /// A byte (also a step's tag).
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian i64.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Length-prefixed bytes (at most 65535).
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let n = u16::try_from(v.len()).expect("a script chunk is at most 65535 bytes");
        self.u16(n);
        self.0.extend_from_slice(v);
        self
    }

    /// Length-prefixed text.
    pub fn string(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// A count byte, then the u64s.
    pub fn seqs(&mut self, v: &[u64]) -> &mut Self {
        self.u8(u8::try_from(v.len()).expect("at most 255 seqs"));
        for s in v {
            self.u64(*s);
        }
        self
    }
}

/// Step tags of the `session_core` script (a tag is read modulo `COUNT`).
pub mod session_tag {
    /// Raw device bytes: `bytes`.
    pub const BYTES: u8 = 0;
    /// A hello: `last_seen_seq u64, epoch u64, ssid string`.
    pub const HELLO: u8 = 1;
    /// An ack: `up_to_seq u64, seqs`.
    pub const ACK: u8 = 2;
    /// A heartbeat reply: `nonce u64`.
    pub const HEARTBEAT_REPLY: u8 = 3;
    /// A network change: `ssid string`.
    pub const NETWORK_CHANGE: u8 = 4;
    /// A VoIP token: `token string`.
    pub const VOIP_TOKEN: u8 = 5;
    /// The device says goodbye: `reason u32`.
    pub const CLIENT_GOODBYE: u8 = 6;
    /// A frame without content.
    pub const EMPTY_FRAME: u8 = 7;
    /// The hub accepts: `last_seen_seq u64`.
    pub const ACCEPT: u8 = 8;
    /// The hub refuses.
    pub const REJECT: u8 = 9;
    /// The hub hands a push: `seq u64`.
    pub const PUSH: u8 = 10;
    /// The hub hands the next `count u8` pushes in order.
    pub const PUSH_NEXT: u8 = 11;
    /// The server ends the session.
    pub const SERVER_GOODBYE: u8 = 12;
    /// Time passes: `ms u16`; the timer is checked.
    pub const ADVANCE: u8 = 13;
    /// Time jumps to the session's deadline.
    pub const FIRE_TIMER: u8 = 14;
    /// Number of tags.
    pub const COUNT: u8 = 15;
}

/// Step tags of the `sdk_core` script (a tag is read modulo `COUNT`).
pub mod sdk_tag {
    /// The host starts the session.
    pub const START: u8 = 0;
    /// The host stops it: `reason u8`.
    pub const STOP: u8 = 1;
    /// The transport connected.
    pub const CONNECTED: u8 = 2;
    /// The transport failed or closed.
    pub const DISCONNECTED: u8 = 3;
    /// Raw server bytes: `bytes`.
    pub const BYTES: u8 = 4;
    /// A `ServerHello`: `heartbeat_interval_ms u32, heartbeat_timeout_ms u32,
    /// max_frame_size u32, server_time_ms i64`.
    pub const SERVER_HELLO: u8 = 5;
    /// A push: `seq u64, id u8, body` (see `BODY_*`).
    pub const PUSH: u8 = 6;
    /// A push just above the highest pushed: `id u8, body`.
    pub const PUSH_NEXT: u8 = 7;
    /// A heartbeat: `nonce u64`.
    pub const HEARTBEAT: u8 = 8;
    /// The server says goodbye: `reason u32`.
    pub const GOODBYE: u8 = 9;
    /// A frame without content.
    pub const EMPTY_FRAME: u8 = 10;
    /// The app took a push it was handed: `index u8`.
    pub const DELIVERED: u8 = 11;
    /// The app reports any sequence: `seq u64`.
    pub const DELIVERED_ANY: u8 = 12;
    /// Joined a network: `ssid string`.
    pub const JOINED: u8 = 13;
    /// Left the network.
    pub const LEFT: u8 = 14;
    /// The path became viable.
    pub const VIABLE: u8 = 15;
    /// The path is no longer viable.
    pub const NOT_VIABLE: u8 = 16;
    /// A PushKit token: `token string`.
    pub const VOIP_TOKEN: u8 = 17;
    /// Time passes: `ms u16`; the timer is checked.
    pub const ADVANCE: u8 = 18;
    /// Time jumps to the session's deadline.
    pub const FIRE_TIMER: u8 = 19;
    /// The host's periodic timer.
    pub const SYSTEM_TIMER: u8 = 20;
    /// Number of tags.
    pub const COUNT: u8 = 21;

    /// Push body: none (an unknown body).
    pub const BODY_NONE: u8 = 0;
    /// Push body: a message, `expires_in_ms i32 (as u32), priority u8, title string`.
    pub const BODY_MESSAGE: u8 = 1;
    /// Push body: a call invite, `call u8, ring_in_ms i32 (as u32)`.
    pub const BODY_CALL_INVITE: u8 = 2;
    /// Push body: a call cancel, `call u8, reason u8`.
    pub const BODY_CALL_CANCEL: u8 = 3;
    /// Number of body kinds.
    pub const BODY_COUNT: u8 = 4;
}

/// Step tags of the `hub` script (a tag is read modulo `COUNT`).
pub mod hub_tag {
    /// A login: `last_seen_seq u64, epoch u64, ssid string, instance_id string,
    /// stale_credential u8 (odd: the previous generation)`.
    pub const LOGIN: u8 = 0;
    /// An ack: `session u8, up_to u64, seqs`.
    pub const ACK: u8 = 1;
    /// Take pushes: `session u8, after_seq u64, max u8`.
    pub const TAKE: u8 = 2;
    /// Take pushes above the last this session took: `session u8, max u8`.
    pub const TAKE_NEXT: u8 = 3;
    /// Mark delivered: `seqs`.
    pub const MARK_DELIVERED: u8 = 4;
    /// Log out: `session u8`.
    pub const LOGOUT: u8 = 5;
    /// Queue a message: `ttl_secs u8`.
    pub const SEND: u8 = 6;
    /// Ring: `call u8, ring_secs u8`.
    pub const CALL: u8 = 7;
    /// Cancel a call: `call u8`.
    pub const CANCEL: u8 = 8;
    /// Wait until everything submitted is durable and released.
    pub const SETTLE: u8 = 9;
    /// Number of tags.
    pub const COUNT: u8 = 10;
}
