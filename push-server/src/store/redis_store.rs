//! The cluster's [`Store`]: Redis holds devices, queues, sequence ceilings, receipts, requests and
//! API keys, plus what only a cluster needs: which node holds each device (a lease with a
//! fencing token), each device's inbox (commands from nodes that do not hold it), the nodes'
//! heartbeats, the sweep index of deadlines, and the pub/sub channels that carry hints,
//! receipts and presence between nodes.
//!
//! # Keys
//! Every per-device key shares the hash tag `{d:<id>}`, so one script touching a device touches
//! one Cluster slot:
//! - `lp:{d:ID}:rec` device record row; `lp:{d:ID}:q` hash seq -> push row; `lp:{d:ID}:ceil`
//!   sequence ceiling (the last one written); `lp:{d:ID}:r:<push id>` receipt row (a key of its own so a
//!   final receipt can expire after the retention);
//! - `lp:{d:ID}:lease` `"<node>|<token>"`: the node holding the device; `lp:{d:ID}:fence` the
//!   counter tokens come from (it only grows, so a token is never reused);
//! - `lp:{d:ID}:inbox` list of opaque commands for whoever holds the device; `lp:{d:ID}:ibn`
//!   the number of the last command ever put there (a holder that applied up to `n - 1` may
//!   apply command `n` straight from its hint).
//!
//! Shared keys: `lp:epoch`, `lp:devices` (set of ids), `lp:g:<group>` (set of ids),
//! `lp:m:<push id>` (set of the devices a push went to, for `receipts(id)`), `lp:req:<id>`,
//! `lp:apikeys` (hash), `lp:node:<node>` (heartbeat, with a TTL), `lp:nodes` (set), `lp:due`
//! (sorted set: device -> earliest deadline of a device nobody holds).
//!
//! # Fencing
//! With fencing on, every batch of ops about a device runs as one Lua script that first checks
//! `lp:{d:ID}:lease == "<this node>|<token>"` for the token this store got when it claimed the
//! device; a node that lost the device (another node stole it, or Redis lost the lease) gets
//! [`StoreError::Fenced`] and nothing of the batch is applied. Without fencing (the conformance
//! suite, a single node) device ops apply unchecked.
//!
//! # How the contract maps onto Redis
//! - **Durable** means "Redis acknowledged" (each script or command replied); how much an
//!   acknowledged write survives is the AOF fsync policy of the operator's Redis.
//! - **Atomic batches**: the ops of one device run as one script, so a batch about one device
//!   (all the hub submits, plus a request record) is all-or-nothing. A batch spanning several
//!   devices is atomic per device: its groups apply in order and the first failure stops it,
//!   leaving the earlier groups applied. A fencing check runs before any write of its group.
//! - **Submission order**: `submit` feeds one queue drained by one writer, which applies a batch
//!   only once the previous one was answered.
//! - **Prune**: final receipts expire `retention` after they are written and requests
//!   `retention` after they expire (never sooner than `retention` after they are written), so
//!   Redis forgets them on its own; `PruneReceipts` still removes exactly what the contract
//!   says, by scanning receipt and request keys (hourly, so the scan is affordable), which keeps
//!   it exact for rows whose clock was off.
//! - **Sequence ceilings** are replaced, not maxed: the contract (and its suite) says a later
//!   op wins; fencing is what keeps a stale node from lowering one.
//! - **Scripts touch shared keys** (`lp:devices`, `lp:g:*`, `lp:m:*`, `lp:due`) next to the
//!   device's own: fine on one Redis (with replicas or Sentinel), not on Redis Cluster, where
//!   those would have to become per-slot structures.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use parking_lot::Mutex;
use redis::{RedisError, Script, ScriptInvocation, TlsCertificates, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::redis_conn::{Master, MasterConn};
use super::rows::{ApiKeyRow, CallRow, DeviceRow, PushRow, ReceiptRow, RequestRow, Row};
use super::{
    ApiKeyRecord, CallRecord, DeviceRecord, Op, Receipt, RequestRecord, Snapshot, Store, StoreError,
    StoredPush,
};

/// A device as stored, loaded by the node that claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Its record.
    pub record: DeviceRecord,
    /// Queued pushes, ordered by seq.
    pub pushes: Vec<StoredPush>,
    /// Sequence ceiling (1 when none is stored).
    pub ceiling: u64,
}

/// The answer to [`RedisStore::claim`].
#[derive(Debug)]
// Claims are rare and answered once: boxing the state would only complicate the callers.
#[allow(clippy::large_enum_variant)]
pub enum Claimed {
    /// No such device.
    Unknown,
    /// Another live node holds it (only when not stealing).
    Held {
        /// The node holding it.
        owner: String,
    },
    /// This node holds it now.
    Mine {
        /// The fencing token every later write about the device carries.
        token: u64,
        /// The node that held it before, if it was stolen from a node (told to let go).
        previous: Option<String>,
        /// The device's stored state.
        state: DeviceState,
        /// Commands waiting in its inbox (trim them with `Op::TrimInbox` in the batch that
        /// applies their outcome).
        inbox: Inbox,
    },
}

/// A device's inbox as read in one step: its commands, oldest first, and the number of the
/// newest one (0 when none was ever queued), so the holder knows which hint comes next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inbox {
    /// Encoded commands, oldest first.
    pub commands: Vec<Vec<u8>>,
    /// The number of the newest command ever queued.
    pub last: u64,
}

/// The answer to [`RedisStore::forward`].
#[derive(Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// In the device's inbox; `owner` is the node holding the device (hinted), if any.
    Queued {
        /// The hinted holder.
        owner: Option<String>,
    },
    /// No such device: nothing was written.
    Unknown,
    /// The device's queue and inbox hold `max_queued` items already: nothing was written.
    Full,
}

/// Something another node (or Redis) told this node, from pub/sub.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// A command was queued in the inbox of a device this node holds, with its number there
    /// (counting from 1; 0 from a node that does not number its hints) and the command itself:
    /// a holder that applied every command before it applies it without reading the inbox.
    Inbox {
        /// The device.
        device: String,
        /// The command's number in the inbox.
        number: u64,
        /// The encoded command.
        command: Vec<u8>,
    },
    /// Another node took this device: let go of it (no write will succeed anyway).
    Kick(String),
    /// A receipt announced by any node (this one included).
    Receipt(Receipt),
    /// A presence event announced by any node, as encoded `lpush.sender.v1.PresenceEvent`.
    Presence(Vec<u8>),
    /// The subscription was re-established: hints may have been lost, re-check inboxes.
    Resubscribed,
}

/// What a node tells every node through pub/sub.
#[derive(Debug, Clone, PartialEq)]
pub enum Announcement {
    /// A receipt, for every node's watchers.
    Receipt(Receipt),
    /// An encoded `lpush.sender.v1.PresenceEvent`.
    Presence(Vec<u8>),
}

/// One node's view of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its name.
    pub node: String,
    /// Its heartbeat has not expired.
    pub alive: bool,
}

/// How long a final receipt (and the push's device set) is kept unless
/// [`RedisStore::set_receipt_retention`] says otherwise.
const DEFAULT_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
/// Claims retried when the lease changed between reading it and the script.
const CLAIM_ATTEMPTS: usize = 5;
/// Capacity of the channel from the pub/sub listener to the hub.
const HEARD_CAPACITY: usize = 1024;
/// How long connecting and subscribing the pub/sub connection may take before it is retried.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
const RECEIPTS_CHANNEL: &str = "lp:receipts";
const PRESENCE_CHANNEL: &str = "lp:presence";
const DEVICES: &str = "lp:devices";
const DUE: &str = "lp:due";
/// Calls by their next step or deadline (Unix ms), for the sweep of every node.
const CALLS_DUE: &str = "lp:calls:due";
const NODES: &str = "lp:nodes";
const EPOCH: &str = "lp:epoch";
const API_KEYS: &str = "lp:apikeys";

fn dkey(device: &str, suffix: &str) -> String {
    format!("lp:{{d:{device}}}:{suffix}")
}

fn receipt_key(device: &str, id: &str) -> String {
    dkey(device, &format!("r:{id}"))
}

fn members_key(id: &str) -> String {
    format!("lp:m:{id}")
}

fn group_key(group: &str) -> String {
    format!("lp:g:{group}")
}

fn hint_channel(node: &str) -> String {
    format!("lp:hint:{node}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The node named by a lease value `"<node>|<token>"`.
fn owner_of(lease: &str) -> &str {
    lease.rsplit_once('|').map_or(lease, |(node, _)| node)
}

// Lua helpers shared by the scripts that write receipts or read leases. Integers that may be
// large (seqs, ceilings, tokens as text) stay strings in Lua; only counts and TTLs are numbers.
const LUA_HELPERS: &str = r#"
local function owner_of(lease)
  return string.match(lease, '^(.*)|[^|]*$') or lease
end
-- A receipt row under its own key; a final one expires after the retention. The push's device
-- set lives as long as its longest-lived receipt: no TTL while any of them is not final.
local function put_receipt(rkey, mkey, id, device, row, final, retention)
  redis.call('SET', rkey, row)
  redis.call('SADD', mkey, device)
  if final ~= '1' then
    redis.call('PERSIST', mkey)
    return
  end
  redis.call('PEXPIRE', rkey, retention)
  if redis.call('PTTL', mkey) >= 0 then
    redis.call('PEXPIRE', mkey, retention, 'GT')
    return
  end
  for _, member in ipairs(redis.call('SMEMBERS', mkey)) do
    if redis.call('PTTL', 'lp:{d:' .. member .. '}:r:' .. id) == -1 then return end
  end
  redis.call('PEXPIRE', mkey, retention)
end
"#;

/// The ops of one device, in order. KEYS: lease, rec, q, ceil, inbox, lp:devices, then the keys
/// each op names (consumed in order). ARGV: expected lease (empty: unfenced), device, retention,
/// whether a `dev` op follows (the current record's groups are read first, so a corrupt record
/// fails the batch before anything is written: scripts do not roll back), then the ops.
static APPLY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_HELPERS}{}",
        r#"
if ARGV[1] ~= '' then
  local lease = redis.call('GET', KEYS[1])
  if not lease then
    -- Leases never expire: a missing one means Redis lost its data, not that a node took over.
    return redis.error_reply('LOST lease missing; redis lost its data')
  end
  if lease ~= ARGV[1] then
    return redis.error_reply('FENCED lease lost')
  end
end
local function varint(s, i)
  local v, mul = 0, 1
  while true do
    local b = string.byte(s, i)
    if not b or mul > 2^49 then return nil end
    i = i + 1
    v = v + (b % 128) * mul
    if b < 128 then return v, i end
    mul = mul * 128
  end
end
-- The groups of a postcard DeviceRow::V1 or V2 (variant, device_id, groups, ...; V2 starts
-- with V1's fields): keep in step with rows.rs when a device row version is added.
local function row_groups(row)
  local variant, i = varint(row, 1)
  if variant ~= 0 and variant ~= 1 then return nil end
  local n
  n, i = varint(row, i)
  if not n then return nil end
  i = i + n
  local count
  count, i = varint(row, i)
  if not count then return nil end
  local groups = {}
  for _ = 1, count do
    n, i = varint(row, i)
    if not n or i + n - 1 > #row then return nil end
    groups[string.sub(row, i, i + n - 1)] = true
    i = i + n
  end
  return groups
end
local device, retention = ARGV[2], ARGV[3]
local current = {}
if ARGV[4] == '1' then
  local old = redis.call('GET', KEYS[2])
  if old then
    current = row_groups(old)
    if not current then return redis.error_reply('CORRUPT unreadable device row') end
  end
end
local k, a = 6, 4
local function key() k = k + 1; return KEYS[k] end
local function arg() a = a + 1; return ARGV[a] end
while a < #ARGV do
  local op = arg()
  if op == 'dev' then
    local row, n = arg(), tonumber(arg())
    local new = {}
    for _ = 1, n do
      local group, gkey = arg(), key()
      new[group] = true
      redis.call('SADD', gkey, device)
    end
    for group in pairs(current) do
      if not new[group] then redis.call('SREM', 'lp:g:' .. group, device) end
    end
    current = new
    redis.call('SET', KEYS[2], row)
    redis.call('SADD', KEYS[6], device)
  elseif op == 'push' then
    local seq, row = arg(), arg()
    redis.call('HSET', KEYS[3], seq, row)
  elseif op == 'del' then
    redis.call('HDEL', KEYS[3], arg())
  elseif op == 'ceil' then
    redis.call('SET', KEYS[4], arg())
  elseif op == 'rcpt' then
    local rkey, mkey = key(), key()
    local id, row, final = arg(), arg(), arg()
    put_receipt(rkey, mkey, id, device, row, final, retention)
  elseif op == 'trim' then
    redis.call('LTRIM', KEYS[5], arg(), -1)
  else
    return redis.error_reply('ERR unknown op ' .. op)
  end
end
return 1
"#
    ))
});

/// KEYS: rec, q, ceil, inbox, lease, fence, lp:due, ibn. ARGV: node, steal, the lease value read
/// just before ('' for none), whether its holder is alive, device.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_HELPERS}{}",
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local cur = redis.call('GET', KEYS[5]) or ''
if cur ~= ARGV[3] then return {'retry'} end
local prev = ''
if cur ~= '' then
  local holder = owner_of(cur)
  if holder ~= ARGV[1] then
    if ARGV[4] == '1' and ARGV[2] ~= '1' then return {'held', holder} end
    prev = holder
  end
end
local token = redis.call('INCR', KEYS[6])
redis.call('SET', KEYS[5], ARGV[1] .. '|' .. string.format('%d', token))
redis.call('ZREM', KEYS[7], ARGV[5])
if prev ~= '' then redis.call('PUBLISH', 'lp:hint:' .. prev, 'kick:' .. ARGV[5]) end
return {'mine', token, redis.call('GET', KEYS[1]), redis.call('HGETALL', KEYS[2]),
  redis.call('GET', KEYS[3]) or '', redis.call('LRANGE', KEYS[4], 0, -1), prev,
  redis.call('GET', KEYS[8]) or '0'}
"#
    ))
});

/// KEYS: lease, lp:due. ARGV: this store's lease value ('' for none), device, earliest deadline
/// ('' for none). The sweep index is only for devices nobody holds, so a device another node
/// holds keeps its (absent) entry.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur and ARGV[1] ~= '' and cur == ARGV[1] then
  redis.call('DEL', KEYS[1])
  cur = false
end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
elseif not cur then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
end
return 1
"#,
    )
});

/// KEYS: rec, q, inbox, lease, lp:due, ibn[, receipt key, device set]. ARGV: command, max,
/// device, due, retention[, push id, receipt row, final].
/// The hint carries the command (`cmd:<number>:<device length>:<device><command>`), and the
/// receipt is announced from here, before the hint: no second round trip for either.
static FORWARD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LUA_HELPERS}{}",
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
if redis.call('HLEN', KEYS[2]) + redis.call('LLEN', KEYS[3]) >= tonumber(ARGV[2]) then
  return {'full'}
end
redis.call('RPUSH', KEYS[3], ARGV[1])
local number = redis.call('INCR', KEYS[6])
if KEYS[7] then
  put_receipt(KEYS[7], KEYS[8], ARGV[6], ARGV[3], ARGV[7], ARGV[8], ARGV[5])
  redis.call('PUBLISH', 'lp:receipts', ARGV[7])
end
local lease = redis.call('GET', KEYS[4])
if lease then
  local holder = owner_of(lease)
  redis.call('PUBLISH', 'lp:hint:' .. holder,
    'cmd:' .. number .. ':' .. #ARGV[3] .. ':' .. ARGV[3] .. ARGV[1])
  return {'queued', holder}
end
redis.call('ZADD', KEYS[5], 'LT', ARGV[4], ARGV[3])
return {'queued'}
"#
    ))
});

/// KEYS: rec, lp:devices, group sets. ARGV: row, device.
/// A call's record is replaced only if it is still the one its decision read (compare and
/// set): two nodes deciding one call at once (two answers) cannot both win. `ARGV[1]` empty:
/// create it, only if absent.
static SWAP_CALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if current then return 0 end
elseif current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
return 1
"#,
    )
});

static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
for i = 2, #KEYS do redis.call('SADD', KEYS[i], ARGV[2]) end
return 1
"#,
    )
});

/// Everything, in one script so that it is one consistent snapshot. Queues and ceilings are
/// found by key pattern, not through `lp:devices`: the contract stores them for devices that
/// have no record too. `KEYS` blocks Redis for a scan of the keyspace: acceptable for the
/// single-node start-up it serves (cluster nodes load nothing but the epoch).
static LOAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local devices = {}
for _, id in ipairs(redis.call('SMEMBERS', 'lp:devices')) do
  local rec = redis.call('GET', 'lp:{d:' .. id .. '}:rec')
  if rec then devices[#devices + 1] = rec end
end
local pushes = {}
for _, key in ipairs(redis.call('KEYS', 'lp:{d:*}:q')) do
  for i, v in ipairs(redis.call('HVALS', key)) do pushes[#pushes + 1] = v end
end
local ceilings = {}
for _, key in ipairs(redis.call('KEYS', 'lp:{d:*}:ceil')) do
  ceilings[#ceilings + 1] = key
  ceilings[#ceilings + 1] = redis.call('GET', key)
end
return {redis.call('GET', 'lp:epoch') or '', devices, pushes, ceilings}
"#,
    )
});

/// KEYS: the push's device set. ARGV: push id. One snapshot of every receipt of the push.
static RECEIPTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for _, device in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local row = redis.call('GET', 'lp:{d:' .. device .. '}:r:' .. ARGV[1])
  if row then out[#out + 1] = row end
end
return out
"#,
    )
});

/// Every device record with its queued count (queue plus inbox).
static DEVICES_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', 'lp:devices')) do
  local prefix = 'lp:{d:' .. id .. '}:'
  local rec = redis.call('GET', prefix .. 'rec')
  if rec then
    out[#out + 1] = rec
    out[#out + 1] = redis.call('HLEN', prefix .. 'q') + redis.call('LLEN', prefix .. 'inbox')
  end
end
return out
"#,
    )
});

/// KEYS: a row's key[, the set to leave]. ARGV: the row as read, member. Deletes the row only if
/// it did not change since the prune read it.
static PRUNE_ONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if KEYS[2] then redis.call('SREM', KEYS[2], ARGV[2]) end
return 1
"#,
    )
});

/// How the store's connections behave when Redis is slow or gone: a request fails after a
/// second instead of waiting through the crate's reconnection retries, so a node reports the
/// outage (health, a refused send) at once; the manager keeps reconnecting in the background.
fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(1)))
        .set_response_timeout(Some(std::time::Duration::from_secs(1)))
        .set_number_of_retries(1)
        .set_max_delay(std::time::Duration::from_millis(500))
}

fn redis_err(e: RedisError) -> StoreError {
    // Refused, or written to a connection Redis had already closed (it restarted): nothing
    // reached it, so the writer may retry (see `Writer::run`). A reset or an end of stream may
    // come after Redis ran the request: never retried.
    let broken_pipe = e.is_io_error() && e.to_string().to_lowercase().contains("broken pipe");
    if e.is_connection_refusal() || broken_pipe {
        return StoreError::Redis(format!("{UNREACHABLE}{e}"));
    }
    StoreError::Redis(e.to_string())
}

/// The epoch Redis holds, drawn at random (non-zero, below 2^53) by whichever node asks first.
async fn ensure_epoch(conn: &mut MasterConn) -> Result<u64, StoreError> {
    let drawn = rand::random::<u64>() % ((1 << 53) - 1) + 1;
    redis::cmd("SET")
        .arg(EPOCH)
        .arg(drawn)
        .arg("NX")
        .query_async::<()>(&mut *conn)
        .await
        .map_err(redis_err)?;
    redis::cmd("GET")
        .arg(EPOCH)
        .query_async(conn)
        .await
        .map_err(redis_err)
}

/// How [`redis_err`] marks a request that never reached Redis.
const UNREACHABLE: &str = "unreachable: ";

/// Whether `result` failed without reaching Redis at all.
fn unreachable(result: &Result<(), StoreError>) -> bool {
    matches!(result, Err(StoreError::Redis(m)) if m.starts_with(UNREACHABLE))
}

/// A script's error reply, mapped: `FENCED` (the lease check), `CORRUPT` (an unreadable row).
fn script_err(device: &str, e: RedisError) -> StoreError {
    match e.code() {
        Some("FENCED") => StoreError::Fenced(device.to_string()),
        Some("LOST") => StoreError::Lost(device.to_string()),
        Some("CORRUPT") => StoreError::Corrupt {
            table: "redis device",
            detail: format!("{device}: {e}"),
        },
        _ => redis_err(e),
    }
}

fn encode<R: Row>(record: &R::Record) -> Vec<u8> {
    postcard::to_allocvec(&R::from_record(record)).expect("rows always encode")
}

fn decode<R: Row>(table: &'static str, bytes: &[u8]) -> Result<R::Record, StoreError> {
    postcard::from_bytes::<R>(bytes)
        .map(Row::into_record)
        .map_err(|e| StoreError::Corrupt {
            table,
            detail: e.to_string(),
        })
}

fn unexpected(what: &str, value: &Value) -> StoreError {
    StoreError::Redis(format!("unexpected reply to {what}: {value:?}"))
}

fn into_array(what: &str, value: Value) -> Result<Vec<Value>, StoreError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected(what, &other)),
    }
}

fn into_bytes(what: &str, value: Value) -> Result<Vec<u8>, StoreError> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        other => Err(unexpected(what, &other)),
    }
}

fn into_string(what: &str, value: Value) -> Result<String, StoreError> {
    String::from_utf8(into_bytes(what, value)?).map_err(|e| StoreError::Redis(format!("{what}: {e}")))
}

fn into_u64(what: &str, value: Value) -> Result<u64, StoreError> {
    match value {
        Value::Int(n) if n >= 0 => Ok(n as u64),
        Value::BulkString(ref bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unexpected(what, &value)),
        other => Err(unexpected(what, &other)),
    }
}

/// The device an op is about; `None` for the shared ops.
fn op_device(op: &Op) -> Option<&str> {
    match op {
        Op::PutDevice(d) => Some(&d.device_id),
        Op::PutPush(p) => Some(&p.device_id),
        Op::DeletePush { device_id, .. }
        | Op::PutSeqCeiling { device_id, .. }
        | Op::TrimInbox { device_id, .. } => Some(device_id),
        Op::PutReceipt(r) => Some(&r.device_id),
        Op::PruneReceipts { .. }
        | Op::PutRequest { .. }
        | Op::PutApiKey { .. }
        | Op::PutCall(_)
        | Op::DeleteCall { .. } => None,
    }
}

/// One step of a batch as the writer applies it.
enum Step {
    /// The ops of one device, in batch order: one script.
    Device(String, Vec<Op>),
    /// A shared op, applied as a plain command.
    Shared(Op),
}

/// A batch split into steps that keep its order where it matters: a device's ops gather into
/// its first step unless a prune came between (a prune must not remove a receipt put after it).
/// Requests and API keys share no key with device ops, so their place among them is free.
fn plan(ops: Vec<Op>) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut groups: HashMap<String, usize> = HashMap::new();
    for op in ops {
        match op_device(&op).map(str::to_owned) {
            Some(device) => match groups.get(&device) {
                Some(&at) => {
                    if let Step::Device(_, ops) = &mut steps[at] {
                        ops.push(op);
                    }
                }
                None => {
                    groups.insert(device.clone(), steps.len());
                    steps.push(Step::Device(device, vec![op]));
                }
            },
            None => {
                if matches!(op, Op::PruneReceipts { .. }) {
                    groups.clear();
                }
                steps.push(Step::Shared(op));
            }
        }
    }
    steps
}

/// One command of a writer's transaction.
enum Command<'a> {
    /// Ops about one device, from the adjacent steps of one or more jobs: one script.
    Device {
        device: &'a str,
        fence: &'a str,
        ops: Vec<&'a Op>,
        jobs: Vec<usize>,
    },
    Shared {
        op: &'a Op,
        job: usize,
    },
}

/// A batch on its way to the writer.
struct Job {
    ops: Vec<Op>,
    /// Fenced mode: the lease value each device of the batch must still have.
    fences: HashMap<String, String>,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// What the writer needs besides its connection.
struct Writer {
    conn: MasterConn,
    /// Steps of the current batch that Redis applied (a batch is retried only if none was).
    steps_applied: usize,
    fenced: bool,
    retention_ms: Arc<AtomicU64>,
}

impl Writer {
    /// Apply batches in order. What queued while Redis answered the previous window goes in one
    /// transaction (one round trip, and with `appendfsync always` one fsync for all of it: a
    /// group commit); each batch is answered with its own outcome. Ends when the queue is
    /// closed and drained.
    async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        while let Some(job) = jobs.recv().await {
            let mut window = vec![job];
            while window.len() < WINDOW_MAX {
                match jobs.try_recv() {
                    Ok(job) => window.push(job),
                    Err(_) => break,
                }
            }
            // A prune takes several round trips: it runs alone, in its place.
            let mut run = Vec::new();
            for job in window {
                if job.ops.iter().any(|op| matches!(op, Op::PruneReceipts { .. })) {
                    self.commit(std::mem::take(&mut run)).await;
                    self.commit_alone(job).await;
                } else {
                    run.push(job);
                }
            }
            self.commit(run).await;
        }
    }

    /// Apply `jobs` in one transaction and answer each.
    async fn commit(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let planned: Vec<Vec<Step>> = jobs.iter().map(|job| plan(job.ops.clone())).collect();
        let mut results = self.transaction(&jobs, &planned).await;
        // Just after Redis returns, the connection is re-established on demand and the first
        // requests are refused: retry for a second a window that never reached Redis. A script
        // Redis no longer knows (it restarted) ran nowhere in the transaction: load it and retry.
        for _ in 0..10 {
            match &results {
                Err(Retry::Unreachable(_)) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(Retry::NoScript) => {
                    if let Err(e) = APPLY.prepare_invoke().load_async(&mut self.conn).await {
                        results = Err(Retry::Unreachable(redis_err(e)));
                        continue;
                    }
                }
                Ok(_) => break,
            }
            results = self.transaction(&jobs, &planned).await;
        }
        let results = results.unwrap_or_else(|retry| {
            let e = match retry {
                Retry::Unreachable(e) => e,
                Retry::NoScript => StoreError::Redis("the apply script cannot be loaded".into()),
            };
            vec![Err(e); jobs.len()]
        });
        let seconds = started.elapsed().as_secs_f64();
        for (job, result) in jobs.into_iter().zip(results) {
            answer(job, result, seconds);
        }
    }

    /// One MULTI/EXEC of every step of `jobs`: each job's outcome, its first failed step's.
    /// Steps run in batch order; a failed step (a fenced device) does not stop the others, as
    /// when each batch was sent alone. Steps about one device that follow each other (a push
    /// applied, then delivered, then acknowledged) run as one script: nothing moves past
    /// anything else, and Redis runs one script instead of several.
    async fn transaction(
        &mut self,
        jobs: &[Job],
        planned: &[Vec<Step>],
    ) -> Result<Vec<Result<(), StoreError>>, Retry> {
        let retention = self.retention_ms.load(Ordering::Relaxed);
        let mut outcomes: Vec<Result<(), StoreError>> = vec![Ok(()); jobs.len()];
        // Per command: the jobs it carries steps of, and the device its script is about.
        let mut commands: Vec<Command<'_>> = Vec::new();
        for (i, (job, steps)) in jobs.iter().zip(planned).enumerate() {
            for step in steps {
                match step {
                    Step::Device(device, ops) => {
                        let fence = if self.fenced {
                            match job.fences.get(device) {
                                Some(fence) => fence.as_str(),
                                None => {
                                    outcomes[i] = Err(StoreError::Fenced(device.clone()));
                                    break;
                                }
                            }
                        } else {
                            ""
                        };
                        match commands.last_mut() {
                            Some(Command::Device {
                                device: last,
                                fence: last_fence,
                                ops: all,
                                jobs,
                            }) if last == device && *last_fence == fence => {
                                all.extend(ops);
                                if jobs.last() != Some(&i) {
                                    jobs.push(i);
                                }
                            }
                            _ => commands.push(Command::Device {
                                device,
                                fence,
                                ops: ops.iter().collect(),
                                jobs: vec![i],
                            }),
                        }
                    }
                    Step::Shared(op) => commands.push(Command::Shared { op, job: i }),
                }
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic().ignore_errors();
        let mut owners: Vec<(Vec<usize>, Option<&str>)> = Vec::with_capacity(commands.len());
        for command in commands {
            match command {
                Command::Device {
                    device,
                    fence,
                    ops,
                    jobs,
                } => {
                    pipe.invoke_script(&device_invocation(device, &ops, fence, retention));
                    owners.push((jobs, Some(device)));
                }
                Command::Shared { op, job } => {
                    pipe.add_command(shared_command(op, retention));
                    owners.push((vec![job], None));
                }
            }
        }
        if owners.is_empty() {
            return Ok(outcomes);
        }
        let replies: Vec<redis::RedisResult<Value>> = match pipe.query_async(&mut self.conn).await {
            Ok(replies) => replies,
            Err(e) => {
                let e = redis_err(e);
                return match &e {
                    StoreError::Redis(m) if m.starts_with(UNREACHABLE) => Err(Retry::Unreachable(e)),
                    _ => Ok(vec![Err(e); jobs.len()]),
                };
            }
        };
        if replies
            .iter()
            .any(|r| matches!(r, Err(e) if e.code() == Some("NOSCRIPT")))
        {
            return Err(Retry::NoScript);
        }
        for ((carried, device), reply) in owners.into_iter().zip(replies) {
            let Err(e) = reply else { continue };
            for i in carried {
                if outcomes[i].is_ok() {
                    outcomes[i] = Err(match device {
                        Some(device) => script_err(device, e.clone()),
                        None => redis_err(e.clone()),
                    });
                }
            }
        }
        Ok(outcomes)
    }

    /// Apply one batch step by step (a prune), answered once Redis replied to all of it.
    async fn commit_alone(&mut self, job: Job) {
        let started = std::time::Instant::now();
        let mut result = self.apply(job.ops.clone(), &job.fences).await;
        for _ in 0..10 {
            if !unreachable(&result) || self.steps_applied > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            result = self.apply(job.ops.clone(), &job.fences).await;
        }
        answer(job, result, started.elapsed().as_secs_f64());
    }

    async fn apply(&mut self, ops: Vec<Op>, fences: &HashMap<String, String>) -> Result<(), StoreError> {
        let retention = self.retention_ms.load(Ordering::Relaxed);
        self.steps_applied = 0;
        for step in plan(ops) {
            self.apply_step(step, fences, retention).await?;
            self.steps_applied += 1;
        }
        Ok(())
    }

    async fn apply_step(
        &mut self,
        step: Step,
        fences: &HashMap<String, String>,
        retention: u64,
    ) -> Result<(), StoreError> {
        {
            match step {
                Step::Device(device, ops) => {
                    let fence = if self.fenced {
                        fences
                            .get(&device)
                            .map(String::as_str)
                            .ok_or_else(|| StoreError::Fenced(device.clone()))?
                    } else {
                        ""
                    };
                    self.apply_device(&device, &ops, fence, retention).await?;
                }
                Step::Shared(Op::PruneReceipts { before_ms }) => self.prune(before_ms).await?,
                Step::Shared(op) => shared_command(&op, retention)
                    .query_async::<()>(&mut self.conn)
                    .await
                    .map_err(redis_err)?,
            }
        }
        Ok(())
    }

    async fn apply_device(
        &mut self,
        device: &str,
        ops: &[Op],
        fence: &str,
        retention: u64,
    ) -> Result<(), StoreError> {
        let ops: Vec<&Op> = ops.iter().collect();
        device_invocation(device, &ops, fence, retention)
            .invoke_async::<()>(&mut self.conn)
            .await
            .map_err(|e| script_err(device, e))
    }

    /// Remove exactly the final receipts older than `before_ms` and the requests that expired
    /// before it. Each row is deleted only if it is still the row read (another node may have
    /// replaced it meanwhile).
    async fn prune(&mut self, before_ms: i64) -> Result<(), StoreError> {
        for key in self.scan("lp:{d:*}:r:*").await? {
            let Some(row) = self.get(&key).await? else {
                continue;
            };
            let Ok(receipt) = decode::<ReceiptRow>("redis receipts", &row) else {
                continue;
            };
            if receipt.state.is_final() && receipt.at_ms < before_ms {
                PRUNE_ONE
                    .key(&key)
                    .key(members_key(&receipt.id))
                    .arg(&row)
                    .arg(&receipt.device_id)
                    .invoke_async::<()>(&mut self.conn)
                    .await
                    .map_err(redis_err)?;
            }
        }
        for key in self.scan("lp:req:*").await? {
            let Some(row) = self.get(&key).await? else {
                continue;
            };
            let Ok(request) = decode::<RequestRow>("redis requests", &row) else {
                continue;
            };
            if request.expires_at_ms < before_ms {
                PRUNE_ONE
                    .key(&key)
                    .arg(&row)
                    .arg("")
                    .invoke_async::<()>(&mut self.conn)
                    .await
                    .map_err(redis_err)?;
            }
        }
        Ok(())
    }

    async fn scan(&mut self, pattern: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.conn)
                .await
                .map_err(redis_err)?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn)
            .await
            .map_err(redis_err)
    }
}

/// Answer `job` with `result`, counted as a commit that took `seconds`.
fn answer(job: Job, result: Result<(), StoreError>, seconds: f64) {
    if let Err(e) = &result {
        tracing::debug!(error = %e, "redis batch failed");
    }
    // A fenced batch is this node's news, not a store failure.
    let ok = !matches!(result, Err(StoreError::Redis(_) | StoreError::Io(_)));
    crate::metrics::store_commit(ok, seconds);
    let _ = job.reply.send(result);
}

/// Why a window must be sent again.
enum Retry {
    /// It never reached Redis.
    Unreachable(StoreError),
    /// Redis no longer knows the apply script (it restarted): nothing of it ran.
    NoScript,
}

/// How many queued batches one transaction takes at most.
const WINDOW_MAX: usize = 256;

/// `ops` about one device, without the writes a later op of the same script overwrites: a
/// receipt followed by a later state of the same push (DELIVERED, then ACKED), a queued push
/// deleted or replaced, a ceiling replaced. The script is atomic, so nobody could have read
/// what is left out: Redis ends in the same state with fewer writes.
fn coalesce<'a>(ops: &[&'a Op]) -> Vec<&'a Op> {
    let (mut receipts, mut pushes, mut ceiling) = (HashSet::new(), HashSet::new(), false);
    let mut kept: Vec<&Op> = ops
        .iter()
        .rev()
        .copied()
        .filter(|op| match op {
            Op::PutReceipt(r) => receipts.insert(r.id.as_str()),
            Op::PutPush(p) => pushes.insert(p.seq),
            Op::DeletePush { seq, .. } => {
                pushes.insert(*seq);
                true
            }
            Op::PutSeqCeiling { .. } => !std::mem::replace(&mut ceiling, true),
            _ => true,
        })
        .collect();
    kept.reverse();
    kept
}

/// The apply script's invocation for `ops`, all about `device`.
fn device_invocation(device: &str, ops: &[&Op], fence: &str, retention: u64) -> ScriptInvocation<'static> {
    let ops = coalesce(ops);
    let has_dev = ops.iter().any(|op| matches!(op, Op::PutDevice(_)));
    let mut invocation = APPLY.key(dkey(device, "lease"));
    invocation
        .key(dkey(device, "rec"))
        .key(dkey(device, "q"))
        .key(dkey(device, "ceil"))
        .key(dkey(device, "inbox"))
        .key(DEVICES)
        .arg(fence)
        .arg(device)
        .arg(retention)
        .arg(if has_dev { "1" } else { "0" });
    for op in ops {
        match op {
            Op::PutDevice(d) => {
                invocation
                    .arg("dev")
                    .arg(encode::<DeviceRow>(d))
                    .arg(d.groups.len());
                for group in &d.groups {
                    invocation.arg(group).key(group_key(group));
                }
            }
            Op::PutPush(p) => {
                invocation
                    .arg("push")
                    .arg(p.seq.to_string())
                    .arg(encode::<PushRow>(p));
            }
            Op::DeletePush { seq, .. } => {
                invocation.arg("del").arg(seq.to_string());
            }
            Op::PutSeqCeiling { ceiling, .. } => {
                invocation.arg("ceil").arg(ceiling.to_string());
            }
            Op::PutReceipt(r) => {
                invocation
                    .arg("rcpt")
                    .key(receipt_key(device, &r.id))
                    .key(members_key(&r.id))
                    .arg(&r.id)
                    .arg(encode::<ReceiptRow>(r))
                    .arg(if r.state.is_final() { "1" } else { "0" });
            }
            Op::TrimInbox { count, .. } => {
                invocation.arg("trim").arg(*count);
            }
            Op::PruneReceipts { .. }
            | Op::PutRequest { .. }
            | Op::PutApiKey { .. }
            | Op::PutCall(_)
            | Op::DeleteCall { .. } => {
                unreachable!("shared ops are planned as shared steps")
            }
        }
    }
    invocation
}

/// The command of a shared op other than a prune (one round trip, no script).
fn shared_command(op: &Op, retention: u64) -> redis::Cmd {
    match op {
        Op::PutApiKey { hash, record } => redis::cmd("HSET")
            .arg(API_KEYS)
            .arg(hash)
            .arg(encode::<ApiKeyRow>(record))
            .take(),
        Op::PutRequest { id, record } => {
            // Kept `retention` past its expiry, and never less than `retention` from now (a
            // request whose clock is off is still recognised).
            let expires = (record.expires_at_ms.max(0) as u64).max(now_ms()) + retention;
            redis::cmd("SET")
                .arg(format!("lp:req:{id}"))
                .arg(encode::<RequestRow>(record))
                .arg("PXAT")
                .arg(expires)
                .take()
        }
        // Kept as long as its receipts are, whatever the node that wrote it does next.
        Op::PutCall(call) => redis::cmd("SET")
            .arg(call_key(&call.call_id))
            .arg(encode::<CallRow>(call))
            .arg("PXAT")
            .arg((call.deadline_ms.max(0) as u64).max(now_ms()) + retention)
            .take(),
        Op::DeleteCall { call_id } => redis::cmd("DEL").arg(call_key(call_id)).take(),
        _ => unreachable!("device ops are planned as device steps, prunes run alone"),
    }
}

/// The key of a call's record.
fn call_key(call_id: &str) -> String {
    format!("lp:call:{{c:{call_id}}}")
}

/// The Redis store of one node.
pub struct RedisStore {
    node: String,
    fenced: bool,
    epoch: AtomicU64,
    master: Arc<Master>,
    /// Commands outside the writer's order (claims, forwards, listings).
    conn: MasterConn,
    /// The synchronous `Store` reads share one blocking connection: they are rare (status
    /// queries, id reuse checks, API-key checks behind a cache) and must not need a runtime.
    /// `None` after an I/O error, reconnected on the next read; replaced when the master moved
    /// (the generation it was opened for is kept with it).
    reader: Mutex<Option<(u64, redis::Connection)>>,
    /// The writer's queue; `None` once closed.
    queue: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    /// The writer thread, joined by `close`.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Fencing tokens of the devices this store claimed.
    tokens: Mutex<HashMap<String, u64>>,
    retention_ms: Arc<AtomicU64>,
    /// Stops the pub/sub listener.
    stop: CancellationToken,
}

impl RedisStore {
    /// Connect to `url` (`redis://host:port/db`) as node `node`; create the epoch if Redis has
    /// none. `fenced`: device ops need a claimed token (cluster mode).
    pub async fn connect(url: &str, node: &str, fenced: bool) -> Result<Arc<Self>, StoreError> {
        Self::connect_with(url, None, node, fenced).await
    }

    /// Like [`RedisStore::connect`], also for `rediss://` and Sentinel URLs
    /// (`redis+sentinel://host:port[,host:port...]/master_name[/db]`, `rediss+sentinel://`),
    /// verifying Redis with `certificates` (a CA, a client certificate) instead of the system's.
    pub async fn connect_with(
        url: &str,
        certificates: Option<TlsCertificates>,
        node: &str,
        fenced: bool,
    ) -> Result<Arc<Self>, StoreError> {
        let master = Master::open(url, certificates).await.map_err(redis_err)?;
        let mut conn = MasterConn::connect(master.clone(), manager_config())
            .await
            .map_err(redis_err)?;
        let epoch = ensure_epoch(&mut conn).await?;

        // The writer runs on a thread of its own with its own runtime and connection, so that
        // `close` (synchronous, maybe called from a runtime thread, or on drop) can wait for it
        // without starving it, whatever runtime the caller has.
        let (queue, jobs) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let retention_ms = Arc::new(AtomicU64::new(DEFAULT_RETENTION_MS));
        let writer_master = master.clone();
        let writer_retention = Arc::clone(&retention_ms);
        let thread = std::thread::Builder::new()
            .name("redis-writer".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(StoreError::Io(e.to_string())));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match MasterConn::connect(writer_master, manager_config()).await {
                        Ok(conn) => {
                            let _ = ready_tx.send(Ok(()));
                            let writer = Writer {
                                conn,
                                steps_applied: 0,
                                fenced,
                                retention_ms: writer_retention,
                            };
                            writer.run(jobs).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(redis_err(e)));
                        }
                    }
                });
            })
            .map_err(|e| StoreError::Io(e.to_string()))?;
        if let Err(e) = ready_rx.await.unwrap_or(Err(StoreError::Closed)) {
            let _ = thread.join();
            return Err(e);
        }
        Ok(Arc::new(Self {
            node: node.to_string(),
            fenced,
            epoch: AtomicU64::new(epoch),
            master,
            conn,
            reader: Mutex::new(None),
            queue: Mutex::new(Some(queue)),
            writer: Mutex::new(Some(thread)),
            tokens: Mutex::new(HashMap::new()),
            retention_ms,
            stop: CancellationToken::new(),
        }))
    }

    /// How long final receipts (and, past their expiry, requests) are kept, in ms; 7 days
    /// unless set. Applies to what is written from now on.
    pub fn set_receipt_retention(&self, ms: u64) {
        self.retention_ms.store(ms, Ordering::Relaxed);
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The epoch this store was opened with, or adopted since. Redis may have been replaced
    /// since: see [`RedisStore::current_epoch`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Redis lost its data: draw a new epoch (or take the one another node drew first).
    pub async fn adopt_new_epoch(&self) -> Result<u64, StoreError> {
        let epoch = ensure_epoch(&mut self.conn()).await?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(epoch)
    }

    /// The epoch Redis holds now (`None`: Redis lost it, so it came back empty).
    pub async fn current_epoch(&self) -> Result<Option<u64>, StoreError> {
        redis::cmd("GET")
            .arg(EPOCH)
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)
    }

    /// Announce this node alive for `ttl_ms`.
    pub async fn heartbeat(&self, ttl_ms: u64) -> Result<(), StoreError> {
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(format!("lp:node:{}", self.node))
            .arg(now_ms())
            .arg("PX")
            .arg(ttl_ms.max(1))
            .ignore()
            .cmd("SADD")
            .arg(NODES)
            .arg(&self.node)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(redis_err)
    }

    /// Every node that ever sent a heartbeat, with whether it is alive.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let mut conn = self.conn();
        let mut nodes: Vec<String> = redis::cmd("SMEMBERS")
            .arg(NODES)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        nodes.sort();
        let mut pipe = redis::pipe();
        for node in &nodes {
            pipe.cmd("EXISTS").arg(format!("lp:node:{node}"));
        }
        let alive: Vec<bool> = if nodes.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await.map_err(redis_err)?
        };
        Ok(nodes
            .into_iter()
            .zip(alive)
            .map(|(node, alive)| NodeInfo { node, alive })
            .collect())
    }

    /// Hold `device_id` on this node. Without `steal`, fails with `Held` if a live node holds it.
    pub async fn claim(&self, device_id: &str, steal: bool) -> Result<Claimed, StoreError> {
        let mut conn = self.conn();
        for _ in 0..CLAIM_ATTEMPTS {
            // Whether the holder is alive is read here (its heartbeat is a shared key); the
            // script then takes the lease only if it is still the value read.
            let lease: Option<String> = redis::cmd("GET")
                .arg(dkey(device_id, "lease"))
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            let alive = match lease.as_deref().map(owner_of) {
                Some(holder) if holder != self.node => redis::cmd("EXISTS")
                    .arg(format!("lp:node:{holder}"))
                    .query_async::<bool>(&mut conn)
                    .await
                    .map_err(redis_err)?,
                _ => false,
            };
            let reply: Value = CLAIM
                .key(dkey(device_id, "rec"))
                .key(dkey(device_id, "q"))
                .key(dkey(device_id, "ceil"))
                .key(dkey(device_id, "inbox"))
                .key(dkey(device_id, "lease"))
                .key(dkey(device_id, "fence"))
                .key(DUE)
                .key(dkey(device_id, "ibn"))
                .arg(&self.node)
                .arg(if steal { "1" } else { "0" })
                .arg(lease.as_deref().unwrap_or(""))
                .arg(if alive { "1" } else { "0" })
                .arg(device_id)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err)?;
            let mut items = into_array("claim", reply)?.into_iter();
            let tag = into_string("claim", items.next().unwrap_or(Value::Nil))?;
            match tag.as_str() {
                "unknown" => return Ok(Claimed::Unknown),
                "retry" => continue,
                "held" => {
                    let owner = into_string("claim", items.next().unwrap_or(Value::Nil))?;
                    return Ok(Claimed::Held { owner });
                }
                "mine" => {
                    let mut next = || items.next().unwrap_or(Value::Nil);
                    let token = into_u64("claim token", next())?;
                    let record = decode::<DeviceRow>("redis devices", &into_bytes("claim", next())?)?;
                    let fields = into_array("claim queue", next())?;
                    let mut pushes = Vec::with_capacity(fields.len() / 2);
                    for (i, value) in fields.into_iter().enumerate() {
                        if i % 2 == 1 {
                            pushes.push(decode::<PushRow>("redis pushes", &into_bytes("claim", value)?)?);
                        }
                    }
                    pushes.sort_by_key(|p| p.seq);
                    let ceiling = match next() {
                        Value::BulkString(b) if b.is_empty() => 1,
                        value => into_u64("claim ceiling", value)?,
                    };
                    let commands = into_array("claim inbox", next())?
                        .into_iter()
                        .map(|v| into_bytes("claim inbox", v))
                        .collect::<Result<Vec<_>, _>>()?;
                    let previous = into_string("claim", next())?;
                    let last = into_u64("claim inbox number", next())?;
                    self.tokens.lock().insert(device_id.to_string(), token);
                    return Ok(Claimed::Mine {
                        token,
                        previous: (!previous.is_empty()).then_some(previous),
                        state: DeviceState {
                            record,
                            pushes,
                            ceiling,
                        },
                        inbox: Inbox { commands, last },
                    });
                }
                other => return Err(StoreError::Redis(format!("unexpected claim answer {other}"))),
            }
        }
        Err(StoreError::Redis(format!(
            "lease of {device_id} kept changing; claim abandoned"
        )))
    }

    /// Let go of `device_id` (if still held by this node). `earliest_deadline_ms`: the earliest
    /// deadline of its queue, so a sweeping node picks it up then (`None`: nothing queued).
    pub async fn release(
        &self,
        device_id: &str,
        earliest_deadline_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let token = self.tokens.lock().remove(device_id);
        let mine = token.map_or(String::new(), |t| format!("{}|{t}", self.node));
        RELEASE
            .key(dkey(device_id, "lease"))
            .key(DUE)
            .arg(mine)
            .arg(device_id)
            .arg(earliest_deadline_ms.map_or(String::new(), |t| t.to_string()))
            .invoke_async::<()>(&mut self.conn())
            .await
            .map_err(redis_err)
    }

    /// Whether this store still holds a token for `device_id`.
    pub fn holds(&self, device_id: &str) -> bool {
        self.tokens.lock().contains_key(device_id)
    }

    /// Forget the token of `device_id` (the hub let go of it after a kick or a fenced write).
    pub fn forget(&self, device_id: &str) {
        self.tokens.lock().remove(device_id);
    }

    /// Put `command` in the inbox of a device this node does not hold, with the accepted
    /// receipt (`accepted`, written in the same script) and the item's deadline (`due_ms`, for
    /// the sweep); hint the holder. Refuses when the device's queue plus inbox hold
    /// `max_queued` items.
    pub async fn forward(
        &self,
        device_id: &str,
        command: Vec<u8>,
        accepted: Option<Receipt>,
        due_ms: i64,
        max_queued: usize,
    ) -> Result<Forwarded, StoreError> {
        let mut invocation = FORWARD.key(dkey(device_id, "rec"));
        invocation
            .key(dkey(device_id, "q"))
            .key(dkey(device_id, "inbox"))
            .key(dkey(device_id, "lease"))
            .key(DUE)
            .key(dkey(device_id, "ibn"))
            .arg(command)
            .arg(max_queued)
            .arg(device_id)
            .arg(due_ms)
            .arg(self.retention_ms.load(Ordering::Relaxed));
        if let Some(r) = &accepted {
            invocation
                .key(receipt_key(device_id, &r.id))
                .key(members_key(&r.id))
                .arg(&r.id)
                .arg(encode::<ReceiptRow>(r))
                .arg(if r.state.is_final() { "1" } else { "0" });
        }
        let reply: Value = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        let mut items = into_array("forward", reply)?.into_iter();
        match into_string("forward", items.next().unwrap_or(Value::Nil))?.as_str() {
            "unknown" => Ok(Forwarded::Unknown),
            "full" => Ok(Forwarded::Full),
            "queued" => Ok(Forwarded::Queued {
                owner: items.next().map(|v| into_string("forward", v)).transpose()?,
            }),
            other => Err(StoreError::Redis(format!("unexpected forward answer {other}"))),
        }
    }

    /// Call `call_id` as stored, with the stored bytes (what [`RedisStore::swap_call`] compares).
    pub async fn call(&self, call_id: &str) -> Result<Option<(CallRecord, Vec<u8>)>, StoreError> {
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(call_key(call_id))
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        raw.map(|raw| Ok((decode::<CallRow>("redis call", &raw)?, raw)))
            .transpose()
    }

    /// Store `call` if the stored record is still `read` (the bytes [`RedisStore::call`]
    /// returned; `None`: create it, if absent). False: another node decided first; read again.
    pub async fn swap_call(&self, read: Option<&[u8]>, call: &CallRecord) -> Result<bool, StoreError> {
        let retention = self.retention_ms.load(Ordering::Relaxed);
        let keep_until = (call.deadline_ms.max(0) as u64).max(now_ms()) + retention;
        let swapped: i64 = SWAP_CALL
            .key(call_key(&call.call_id))
            .arg(read.unwrap_or_default())
            .arg(encode::<CallRow>(call))
            .arg(keep_until)
            .invoke_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        Ok(swapped == 1)
    }

    /// The inbox of a device this node holds, with the number of its newest command.
    pub async fn inbox(&self, device_id: &str) -> Result<Inbox, StoreError> {
        let (commands, last): (Vec<Vec<u8>>, Option<u64>) = redis::pipe()
            .atomic()
            .cmd("LRANGE")
            .arg(dkey(device_id, "inbox"))
            .arg(0)
            .arg(-1)
            .cmd("GET")
            .arg(dkey(device_id, "ibn"))
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        Ok(Inbox {
            commands,
            last: last.unwrap_or(0),
        })
    }

    /// Those of `device_ids` whose inbox holds commands, in order (one round trip per 1,000).
    pub async fn with_inbox(&self, device_ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut found = Vec::new();
        for chunk in device_ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("EXISTS").arg(dkey(id, "inbox"));
            }
            let exists: Vec<bool> = pipe.query_async(&mut self.conn()).await.map_err(redis_err)?;
            found.extend(
                chunk
                    .iter()
                    .zip(exists)
                    .filter(|(_, e)| *e)
                    .map(|(id, _)| id.clone()),
            );
        }
        Ok(found)
    }

    /// Up to `limit` devices nobody holds whose earliest deadline is at or before `now_ms`.
    pub async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.due_in(DUE, now_ms, limit).await
    }

    /// Up to `limit` members of the sorted set `key` scored at or before `now_ms`.
    async fn due_in(&self, key: &str, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        redis::cmd("ZRANGEBYSCORE")
            .arg(key)
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)
    }

    /// When call `call_id` must next be decided (a step or its deadline); `None`: never again.
    pub async fn plan_call(&self, call_id: &str, at: Option<i64>) -> Result<(), StoreError> {
        let cmd = match at {
            Some(at) => redis::cmd("ZADD").arg(CALLS_DUE).arg(at).arg(call_id).take(),
            None => redis::cmd("ZREM").arg(CALLS_DUE).arg(call_id).take(),
        };
        cmd.query_async::<()>(&mut self.conn()).await.map_err(redis_err)
    }

    /// Up to `limit` calls due by `now_ms`, whichever node placed them.
    pub async fn calls_due(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.due_in(CALLS_DUE, now_ms, limit).await
    }

    /// The node holding each device (`None`: nobody), in order.
    pub async fn holders(&self, device_ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for id in device_ids {
            cmd.arg(dkey(id, "lease"));
        }
        let leases: Vec<Option<String>> = cmd.query_async(&mut self.conn()).await.map_err(redis_err)?;
        Ok(leases
            .into_iter()
            .map(|l| l.map(|l| owner_of(&l).to_string()))
            .collect())
    }

    /// Every device record, ordered by id, with the number of queued pushes plus inbox items.
    pub async fn devices(&self) -> Result<Vec<(DeviceRecord, usize)>, StoreError> {
        let reply: Value = DEVICES_SCRIPT
            .invoke_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        let mut items = into_array("devices", reply)?.into_iter();
        let mut devices = Vec::new();
        while let (Some(row), Some(count)) = (items.next(), items.next()) {
            let record = decode::<DeviceRow>("redis devices", &into_bytes("devices", row)?)?;
            devices.push((record, into_u64("devices", count)? as usize));
        }
        devices.sort_by(|a, b| a.0.device_id.cmp(&b.0.device_id));
        Ok(devices)
    }

    /// One device record, with its queued count.
    pub async fn device(&self, device_id: &str) -> Result<Option<(DeviceRecord, usize)>, StoreError> {
        let (row, queued, inbox): (Option<Vec<u8>>, usize, usize) = redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(dkey(device_id, "rec"))
            .cmd("HLEN")
            .arg(dkey(device_id, "q"))
            .cmd("LLEN")
            .arg(dkey(device_id, "inbox"))
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        row.map(|row| Ok((decode::<DeviceRow>("redis devices", &row)?, queued + inbox)))
            .transpose()
    }

    /// Register a new device (record written only if absent); false if it exists.
    pub async fn create_device(&self, record: &DeviceRecord) -> Result<bool, StoreError> {
        let mut invocation = CREATE.key(dkey(&record.device_id, "rec"));
        invocation
            .key(DEVICES)
            .arg(encode::<DeviceRow>(record))
            .arg(&record.device_id);
        for group in &record.groups {
            invocation.key(group_key(group));
        }
        invocation.invoke_async(&mut self.conn()).await.map_err(redis_err)
    }

    /// Ids of the devices in `group`.
    pub async fn group_members(&self, group: &str) -> Result<Vec<String>, StoreError> {
        let mut members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(group_key(group))
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        members.sort();
        Ok(members)
    }

    /// Announce `all` to every node (`Heard::Receipt`, `Heard::Presence`), in order, in one
    /// round trip.
    pub async fn announce(&self, all: &[Announcement]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for a in all {
            let (channel, payload) = match a {
                Announcement::Receipt(r) => (RECEIPTS_CHANNEL, encode::<ReceiptRow>(r)),
                Announcement::Presence(e) => (PRESENCE_CHANNEL, e.clone()),
            };
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await.map_err(redis_err)
    }

    /// Start listening: hints for this node, receipts and presence of all nodes. Reconnects on
    /// its own (then sends `Resubscribed`). One call per store.
    pub fn subscribe(self: &Arc<Self>) -> mpsc::Receiver<Heard> {
        let (tx, rx) = mpsc::channel(HEARD_CAPACITY);
        // The listener holds no reference to the store, so dropping the store still closes it;
        // it ends when the store closes or the receiver is dropped.
        let listener = Listener {
            master: self.master.clone(),
            channels: vec![
                hint_channel(&self.node),
                RECEIPTS_CHANNEL.into(),
                PRESENCE_CHANNEL.into(),
            ],
            tx,
            stop: self.stop.clone(),
            lost: false,
        };
        tokio::spawn(listener.run());
        rx
    }

    fn conn(&self) -> MasterConn {
        self.conn.clone()
    }

    /// Run `f` on the blocking read connection, connecting it first if needed.
    fn read<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut reader = self.reader.lock();
        // Blocking, this connection cannot ask Sentinel itself: it follows the master the async
        // connections found (the heartbeat's, at least once a second).
        let (generation, client) = self.master.current();
        if reader.as_ref().is_none_or(|(seen, _)| *seen != generation) {
            *reader = None;
            let conn = client
                .get_connection_with_timeout(Duration::from_secs(5))
                .map_err(redis_err)?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(redis_err)?;
            conn.set_write_timeout(Some(Duration::from_secs(5)))
                .map_err(redis_err)?;
            *reader = Some((generation, conn));
        }
        let (_, conn) = reader.as_mut().expect("connected above");
        let result = f(conn);
        if let Err(e) = &result
            && (e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() || e.is_timeout())
        {
            *reader = None;
        }
        result.map_err(redis_err)
    }
}

/// The pub/sub side of a store: one connection, re-established with backoff (to the master
/// Sentinel names now, after a failover).
struct Listener {
    master: Arc<Master>,
    channels: Vec<String>,
    tx: mpsc::Sender<Heard>,
    stop: CancellationToken,
    /// A hint was dropped (full channel) or the subscription was re-established: tell the hub
    /// with `Resubscribed` as soon as there is room.
    lost: bool,
}

impl Listener {
    async fn run(mut self) {
        const FIRST_BACKOFF: Duration = Duration::from_millis(100);
        let mut backoff = FIRST_BACKOFF;
        let mut connected_before = false;
        loop {
            let (generation, client) = self.master.current();
            // Bounded: a master that accepts the connection and then says nothing (paused,
            // half-open) must not stall the hints forever.
            let connect = async {
                let subscribed = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&self.channels).await?;
                    Ok::<_, RedisError>(pubsub)
                };
                tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribed)
                    .await
                    .unwrap_or_else(|_| Err(RedisError::from((redis::ErrorKind::Io, "subscribe timed out"))))
            };
            let connected = tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.tx.closed() => return,
                connected = connect => connected,
            };
            match connected {
                Ok(pubsub) => {
                    backoff = FIRST_BACKOFF;
                    self.lost |= connected_before;
                    connected_before = true;
                    if !self.listen(pubsub).await {
                        return;
                    }
                    tracing::warn!("redis pub/sub connection lost; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "redis pub/sub connect failed"),
            }
            // Sentinel may name a new master: then try it at once.
            let moved = tokio::select! {
                _ = self.stop.cancelled() => return,
                moved = self.master.clone().follow(generation) => moved,
            };
            if moved {
                backoff = FIRST_BACKOFF;
                continue;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Forward messages until the connection drops (true) or the listener must end (false).
    async fn listen(&mut self, pubsub: redis::aio::PubSub) -> bool {
        let mut messages = pubsub.into_on_message();
        let mut retry = tokio::time::interval(Duration::from_millis(200));
        loop {
            if self.lost {
                match self.tx.try_send(Heard::Resubscribed) {
                    Ok(()) => self.lost = false,
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                }
            }
            let message = tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = self.tx.closed() => return false,
                _ = retry.tick(), if self.lost => continue,
                message = messages.next() => message,
            };
            let Some(message) = message else { return true };
            let payload = message.get_payload_bytes();
            let heard = match message.get_channel_name() {
                RECEIPTS_CHANNEL => match decode::<ReceiptRow>("redis receipts", payload) {
                    Ok(receipt) => Heard::Receipt(receipt),
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable receipt announcement");
                        continue;
                    }
                },
                PRESENCE_CHANNEL => Heard::Presence(payload.to_vec()),
                _ => match parse_hint(payload) {
                    Some(heard) => heard,
                    None => {
                        tracing::warn!(hint = %String::from_utf8_lossy(payload), "unknown hint");
                        continue;
                    }
                },
            };
            // Never wait for the hub: a full channel drops announcements (the hub re-reads the
            // store when it needs them) and turns lost hints into a later `Resubscribed`.
            match self.tx.try_send(heard) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(heard)) => match heard {
                    Heard::Inbox { .. } | Heard::Kick(_) => self.lost = true,
                    dropped => tracing::debug!(?dropped, "hub is behind; announcement dropped"),
                },
            }
        }
    }
}

/// A hint on `lp:hint:<node>`: `cmd:<number>:<device length>:<device><command>` (from
/// `FORWARD`), `kick:<device>` (from `CLAIM`), or `inbox:<device>` (an older node's forward).
fn parse_hint(payload: &[u8]) -> Option<Heard> {
    fn field(rest: &[u8]) -> Option<(u64, &[u8])> {
        let colon = rest.iter().position(|&b| b == b':')?;
        let value = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
        Some((value, &rest[colon + 1..]))
    }
    let utf8 = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).ok();
    if let Some(rest) = payload.strip_prefix(b"cmd:") {
        let (number, rest) = field(rest)?;
        let (len, rest) = field(rest)?;
        let len = usize::try_from(len).ok().filter(|&len| len <= rest.len())?;
        let (device, command) = rest.split_at(len);
        return Some(Heard::Inbox {
            device: utf8(device)?,
            number,
            command: command.to_vec(),
        });
    }
    if let Some(device) = payload.strip_prefix(b"kick:") {
        return Some(Heard::Kick(utf8(device)?));
    }
    let device = payload.strip_prefix(b"inbox:")?;
    Some(Heard::Inbox {
        device: utf8(device)?,
        number: 0,
        command: Vec::new(),
    })
}

impl Store for RedisStore {
    /// Unfenced (one node): everything, from one script. Fenced (cluster): only the epoch;
    /// nodes claim devices lazily, as sessions and sends need them.
    fn load(&self) -> Result<Snapshot, StoreError> {
        if self.fenced {
            return Ok(Snapshot {
                epoch: self.epoch(),
                ..Snapshot::default()
            });
        }
        let reply: Value = self.read(|conn| LOAD.invoke(conn))?;
        let mut items = into_array("load", reply)?.into_iter();
        let mut next = || items.next().unwrap_or(Value::Nil);
        let epoch = match next() {
            Value::BulkString(b) if b.is_empty() => self.epoch(),
            value => into_u64("load epoch", value)?,
        };
        let mut devices = into_array("load", next())?
            .into_iter()
            .map(|row| decode::<DeviceRow>("redis devices", &into_bytes("load", row)?))
            .collect::<Result<Vec<_>, _>>()?;
        devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        let mut pushes = into_array("load", next())?
            .into_iter()
            .map(|row| decode::<PushRow>("redis pushes", &into_bytes("load", row)?))
            .collect::<Result<Vec<_>, _>>()?;
        pushes.sort_by(|a, b| (a.device_id.as_str(), a.seq).cmp(&(b.device_id.as_str(), b.seq)));
        let mut seq_ceilings = Vec::new();
        let mut ceilings = into_array("load", next())?.into_iter();
        while let (Some(key), Some(value)) = (ceilings.next(), ceilings.next()) {
            let key = into_string("load", key)?;
            let device = key
                .strip_prefix("lp:{d:")
                .and_then(|k| k.strip_suffix("}:ceil"))
                .ok_or_else(|| StoreError::Redis(format!("unexpected ceiling key {key}")))?;
            seq_ceilings.push((device.to_string(), into_u64("load ceiling", value)?));
        }
        seq_ceilings.sort();
        Ok(Snapshot {
            epoch,
            devices,
            pushes,
            seq_ceilings,
            // A cluster node holds no call at start: each is read when a decision needs it.
            calls: Vec::new(),
        })
    }

    fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (reply, answer) = oneshot::channel();
        let mut fences = HashMap::new();
        if self.fenced {
            // A device this store did not claim fails the batch before it reaches Redis.
            let tokens = self.tokens.lock();
            let devices: HashSet<&str> = ops.iter().filter_map(op_device).collect();
            for device in devices {
                match tokens.get(device) {
                    Some(token) => {
                        fences.insert(device.to_string(), format!("{}|{token}", self.node));
                    }
                    None => {
                        let _ = reply.send(Err(StoreError::Fenced(device.to_string())));
                        return answer;
                    }
                }
            }
        }
        // Sending under the lock gives one order across threads, and none after `close`.
        let queue = self.queue.lock();
        let job = Job { ops, fences, reply };
        match &*queue {
            Some(queue) => {
                if let Err(mpsc::error::SendError(job)) = queue.send(job) {
                    let _ = job.reply.send(Err(StoreError::Closed));
                }
            }
            None => {
                let _ = job.reply.send(Err(StoreError::Closed));
            }
        }
        answer
    }

    fn receipts(&self, id: &str) -> Result<Vec<Receipt>, StoreError> {
        let rows: Vec<Vec<u8>> = self.read(|conn| RECEIPTS.key(members_key(id)).arg(id).invoke(conn))?;
        let mut receipts = rows
            .iter()
            .map(|row| decode::<ReceiptRow>("redis receipts", row))
            .collect::<Result<Vec<_>, _>>()?;
        receipts.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        Ok(receipts)
    }

    fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let row: Option<Vec<u8>> =
            self.read(|conn| redis::cmd("GET").arg(format!("lp:req:{id}")).query(conn))?;
        row.map(|row| decode::<RequestRow>("redis requests", &row))
            .transpose()
    }

    fn api_key(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row: Option<Vec<u8>> =
            self.read(|conn| redis::cmd("HGET").arg(API_KEYS).arg(hash).query(conn))?;
        row.map(|row| decode::<ApiKeyRow>("redis api keys", &row))
            .transpose()
    }

    fn api_keys(&self) -> Result<Vec<(String, ApiKeyRecord)>, StoreError> {
        let rows: Vec<(String, Vec<u8>)> =
            self.read(|conn| redis::cmd("HGETALL").arg(API_KEYS).query(conn))?;
        let mut keys = rows
            .into_iter()
            .map(|(hash, row)| Ok((hash, decode::<ApiKeyRow>("redis api keys", &row)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(keys)
    }

    fn close(&self) {
        // Dropping the only sender ends the writer once it has applied what was queued.
        drop(self.queue.lock().take());
        self.stop.cancel();
        // Joining under the lock makes a concurrent `close` wait for the final commit too.
        let mut writer = self.writer.lock();
        if let Some(thread) = writer.take()
            && thread.join().is_err()
        {
            tracing::error!("redis writer thread panicked; batches it held were answered `Closed`");
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::store::{PushKind, ReceiptState, commit};
    use testkit::redis::RedisServer;

    // Each test gets fresh servers; the factory keeps one per directory, so opening a directory
    // again ("reopen") connects to the same server. The servers die with the factory.
    crate::store::conformance::conformance_suite!(redis, {
        let servers: Mutex<HashMap<PathBuf, RedisServer>> = Mutex::new(HashMap::new());
        move |dir: &Path| -> Arc<dyn Store> {
            let url = servers
                .lock()
                .entry(dir.to_path_buf())
                .or_insert_with(|| RedisServer::start().expect("redis-server starts"))
                .url
                .clone();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(RedisStore::connect(&url, "n1", false))
            })
            .expect("connect")
        }
    });

    fn device(id: &str, groups: &[&str]) -> DeviceRecord {
        DeviceRecord {
            device_id: id.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            created_at_ms: 1,
            credential_generation: 1,
            revoked: false,
            last_seen_ms: 2,
            last_ssid: String::new(),
            last_disconnect_reason: String::new(),
            sdk_version: "1.0".into(),
            voip_token: String::new(),
            voip_token_invalid: false,
            ca_generation: 0,
        }
    }

    fn push(device_id: &str, seq: u64) -> StoredPush {
        StoredPush {
            device_id: device_id.into(),
            seq,
            id: format!("m{seq}"),
            kind: PushKind::Message,
            collapse_key: String::new(),
            expires_at_ms: i64::MAX / 2,
            encoded: vec![seq as u8],
        }
    }

    fn receipt(id: &str, device_id: &str, state: ReceiptState) -> Receipt {
        Receipt {
            id: id.into(),
            device_id: device_id.into(),
            state,
            reason: String::new(),
            at_ms: 5,
            path: String::new(),
        }
    }

    fn raw(server: &RedisServer) -> ::redis::Connection {
        ::redis::Client::open(server.url.as_str())
            .expect("client")
            .get_connection()
            .expect("connection")
    }

    fn query<T: ::redis::FromRedisValue>(server: &RedisServer, args: &[&str]) -> T {
        let mut cmd = ::redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut raw(server)).expect("query")
    }

    /// A fenced (cluster) store of `node`.
    async fn fenced(server: &RedisServer, node: &str) -> Arc<RedisStore> {
        RedisStore::connect(&server.url, node, true)
            .await
            .expect("connect")
    }

    async fn heard(rx: &mut mpsc::Receiver<Heard>, want: impl Fn(&Heard) -> bool) -> Heard {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let heard = rx.recv().await.expect("listener alive");
                if want(&heard) {
                    return heard;
                }
            }
        })
        .await
        .expect("heard in time")
    }

    /// Subscriptions are asynchronous: wait until the node's hint channel has a subscriber.
    async fn wait_subscribed(server: &RedisServer, node: &str) {
        let channel = hint_channel(node);
        for _ in 0..500 {
            let counts: Vec<(String, u64)> = query(server, &["PUBSUB", "NUMSUB", &channel]);
            if counts[0].1 > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{node} never subscribed");
    }

    /// The writer sends what queued meanwhile as one transaction (one fsync for all of it),
    /// and each batch still gets its own outcome: a fenced one fails alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_batches_share_a_transaction_and_keep_their_own_outcomes() {
        let server = RedisServer::start().expect("redis-server starts");
        let a = fenced(&server, "A").await;
        a.heartbeat(60_000).await.expect("heartbeat");
        for id in ["d1", "d2"] {
            assert!(a.create_device(&device(id, &[])).await.expect("create"));
            assert!(matches!(
                a.claim(id, false).await.expect("claim"),
                Claimed::Mine { .. }
            ));
        }
        a.forget("d2");
        let execs_before = calls(&server, "exec");
        let scripts_before = calls(&server, "evalsha");
        const N: u64 = 1000;
        let replies: Vec<_> = (1..=N)
            .map(|seq| {
                let device = if seq == N / 2 { "d2" } else { "d1" };
                a.submit(vec![Op::PutPush(push(device, seq))])
            })
            .collect();
        let mut outcomes = Vec::new();
        for reply in replies {
            outcomes.push(reply.await.expect("answered"));
        }
        for (seq, outcome) in (1..=N).zip(&outcomes) {
            if seq == N / 2 {
                assert!(
                    matches!(outcome, Err(StoreError::Fenced(d)) if d == "d2"),
                    "{outcome:?}"
                );
            } else {
                assert!(outcome.is_ok(), "batch {seq}: {outcome:?}");
            }
        }
        let stored: u64 = query(&server, &["HLEN", &dkey("d1", "q")]);
        assert_eq!(stored, N - 1, "every other batch stored");
        let execs = calls(&server, "exec") - execs_before;
        assert!(
            (1..N / 2).contains(&execs),
            "{N} batches took {execs} transactions"
        );
        // Adjacent batches of d1 ran as one script: at most d1, d2, d1 per transaction.
        let scripts = calls(&server, "evalsha") - scripts_before;
        assert!(
            scripts <= 3 * execs && scripts < N / 2,
            "{N} batches in {execs} transactions took {scripts} scripts"
        );
    }

    /// Redis forgot the apply script (it restarted, or SCRIPT FLUSH): nothing of the window
    /// ran, so the writer loads the script and sends the window again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forgotten_script_is_loaded_again_and_the_batches_applied_once() {
        let server = RedisServer::start().expect("redis-server starts");
        let a = fenced(&server, "A").await;
        a.heartbeat(60_000).await.expect("heartbeat");
        assert!(a.create_device(&device("d1", &[])).await.expect("create"));
        assert!(matches!(
            a.claim("d1", false).await.expect("claim"),
            Claimed::Mine { .. }
        ));
        commit(&*a, vec![Op::PutPush(push("d1", 1))])
            .await
            .expect("stored");
        let _: () = query(&server, &["SCRIPT", "FLUSH"]);
        commit(
            &*a,
            vec![
                Op::PutPush(push("d1", 2)),
                Op::PutRequest {
                    id: "r1".into(),
                    record: crate::store::rows::tests::request(),
                },
            ],
        )
        .await
        .expect("stored after the script is loaded again");
        let stored: u64 = query(&server, &["HLEN", &dkey("d1", "q")]);
        assert_eq!(stored, 2);
        let requests: u64 = query(&server, &["EXISTS", "lp:req:r1"]);
        assert_eq!(requests, 1);
    }

    /// How many times Redis ran `command` (lower case).
    fn calls(server: &RedisServer, command: &str) -> u64 {
        let info: String = query(server, &["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stealing_fences_the_previous_holder() {
        let server = RedisServer::start().expect("redis-server starts");
        let a = fenced(&server, "A").await;
        let b = fenced(&server, "B").await;
        a.heartbeat(60_000).await.expect("heartbeat");
        b.heartbeat(60_000).await.expect("heartbeat");
        assert!(a.create_device(&device("d1", &["g"])).await.expect("create"));
        assert!(
            !b.create_device(&device("d1", &[])).await.expect("create"),
            "exists"
        );
        assert!(matches!(
            a.claim("nope", false).await.expect("claim"),
            Claimed::Unknown
        ));

        // Unclaimed: refused without touching Redis.
        let refused = commit(&*a, vec![Op::PutPush(push("d1", 1))]).await;
        assert!(
            matches!(refused, Err(StoreError::Fenced(ref d)) if d == "d1"),
            "{refused:?}"
        );

        let mut heard_a = a.subscribe();
        wait_subscribed(&server, "A").await;
        let Claimed::Mine {
            token: first,
            previous,
            state,
            ..
        } = a.claim("d1", false).await.expect("claim")
        else {
            panic!("A claims a free device")
        };
        assert_eq!(previous, None);
        assert_eq!(state.record, device("d1", &["g"]));
        assert_eq!(state.ceiling, 1);
        commit(
            &*a,
            vec![
                Op::PutPush(push("d1", 1)),
                Op::PutSeqCeiling {
                    device_id: "d1".into(),
                    ceiling: 2,
                },
            ],
        )
        .await
        .expect("A holds d1");
        assert!(a.holds("d1"));

        let held = b.claim("d1", false).await.expect("claim");
        assert!(
            matches!(held, Claimed::Held { ref owner } if owner == "A"),
            "{held:?}"
        );
        let Claimed::Mine {
            token: second,
            previous,
            state,
            ..
        } = b.claim("d1", true).await.expect("steal")
        else {
            panic!("B steals d1")
        };
        assert!(second > first, "tokens grow: {first} then {second}");
        assert_eq!(previous.as_deref(), Some("A"));
        assert_eq!(state.pushes, [push("d1", 1)]);
        assert_eq!(state.ceiling, 2);
        assert_eq!(
            heard(&mut heard_a, |h| matches!(h, Heard::Kick(_))).await,
            Heard::Kick("d1".into())
        );
        assert_eq!(
            b.holders(&["d1".into(), "d2".into()]).await.expect("holders"),
            [Some("B".into()), None]
        );

        // A still has its old token: its write is fenced and leaves nothing.
        let fenced_write = commit(
            &*a,
            vec![
                Op::PutPush(push("d1", 2)),
                Op::PutReceipt(receipt("m2", "d1", ReceiptState::Accepted)),
            ],
        )
        .await;
        assert!(
            matches!(fenced_write, Err(StoreError::Fenced(ref d)) if d == "d1"),
            "{fenced_write:?}"
        );
        assert_eq!(query::<u64>(&server, &["HLEN", "lp:{d:d1}:q"]), 1);
        assert_eq!(query::<u64>(&server, &["EXISTS", "lp:{d:d1}:r:m2", "lp:m:m2"]), 0);
        commit(&*b, vec![Op::PutPush(push("d1", 3))])
            .await
            .expect("B holds d1");
        assert_eq!(query::<u64>(&server, &["HLEN", "lp:{d:d1}:q"]), 2);

        // B releases with a deadline: the sweep sees it; A's release of a lease it lost is a no-op.
        a.release("d1", Some(50)).await.expect("release");
        assert_eq!(
            b.holders(&["d1".into()]).await.expect("holders"),
            [Some("B".into())]
        );
        assert!(
            a.due(100, 10).await.expect("due").is_empty(),
            "a held device is not due"
        );
        b.release("d1", Some(50)).await.expect("release");
        assert!(!b.holds("d1"));
        assert_eq!(a.due(49, 10).await.expect("due"), Vec::<String>::new());
        assert_eq!(a.due(50, 10).await.expect("due"), ["d1"]);
        let Claimed::Mine {
            token: third,
            previous,
            ..
        } = a.claim("d1", false).await.expect("claim")
        else {
            panic!("A claims a released device")
        };
        assert!(third > second);
        assert_eq!(previous, None);
        assert!(
            a.due(100, 10).await.expect("due").is_empty(),
            "a claim takes it off the sweep"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_nodes_lease_is_taken_without_stealing() {
        let server = RedisServer::start().expect("redis-server starts");
        let a = fenced(&server, "A").await;
        let b = fenced(&server, "B").await;
        a.heartbeat(100).await.expect("heartbeat");
        b.heartbeat(60_000).await.expect("heartbeat");
        a.create_device(&device("d1", &[])).await.expect("create");
        assert!(matches!(
            a.claim("d1", false).await.expect("claim"),
            Claimed::Mine { .. }
        ));
        assert!(matches!(
            b.claim("d1", false).await.expect("claim"),
            Claimed::Held { .. }
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let nodes = b.nodes().await.expect("nodes");
        assert_eq!(
            nodes,
            [
                NodeInfo {
                    node: "A".into(),
                    alive: false
                },
                NodeInfo {
                    node: "B".into(),
                    alive: true
                }
            ]
        );
        let claimed = b.claim("d1", false).await.expect("claim");
        assert!(
            matches!(claimed, Claimed::Mine { ref previous, .. } if previous.as_deref() == Some("A")),
            "{claimed:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_commands_wait_in_the_inbox() {
        let server = RedisServer::start().expect("redis-server starts");
        let a = fenced(&server, "A").await;
        let b = fenced(&server, "B").await;
        a.create_device(&device("d1", &[])).await.expect("create");
        a.create_device(&device("d2", &[])).await.expect("create");

        // Nobody holds d1: queued, due at the earliest deadline, receipt written.
        let accepted = receipt("m1", "d1", ReceiptState::Accepted);
        let queued = a
            .forward("d1", b"one".to_vec(), Some(accepted.clone()), 300, 10)
            .await
            .expect("forward");
        assert_eq!(queued, Forwarded::Queued { owner: None });
        a.forward("d1", b"two".to_vec(), None, 200, 10)
            .await
            .expect("forward");
        a.forward("d1", b"three".to_vec(), None, 400, 10)
            .await
            .expect("forward");
        assert_eq!(a.due(199, 10).await.expect("due"), Vec::<String>::new());
        assert_eq!(a.due(200, 10).await.expect("due"), ["d1"]);
        assert_eq!(a.receipts("m1").expect("receipts"), [accepted]);
        assert_eq!(a.device("d1").await.expect("device").map(|d| d.1), Some(3));

        let Claimed::Mine { inbox, .. } = a.claim("d1", false).await.expect("claim") else {
            panic!("claim")
        };
        let three = |commands: Vec<&[u8]>, last| Inbox {
            commands: commands.into_iter().map(<[u8]>::to_vec).collect(),
            last,
        };
        assert_eq!(inbox, three(vec![b"one", b"two", b"three"], 3));
        commit(
            &*a,
            vec![
                Op::PutPush(push("d1", 1)),
                Op::TrimInbox {
                    device_id: "d1".into(),
                    count: 2,
                },
            ],
        )
        .await
        .expect("trim");
        assert_eq!(a.inbox("d1").await.expect("inbox"), three(vec![b"three"], 3));

        // d1 holds one push and one command: a third item is refused, and nothing is written.
        assert_eq!(
            a.forward("d1", b"x".to_vec(), None, 1, 2).await.expect("forward"),
            Forwarded::Full
        );
        assert_eq!(
            a.forward(
                "nope",
                b"x".to_vec(),
                Some(receipt("m9", "nope", ReceiptState::Accepted)),
                1,
                9
            )
            .await
            .expect("forward"),
            Forwarded::Unknown
        );
        // Refused commands take no number.
        assert_eq!(a.inbox("d1").await.expect("inbox"), three(vec![b"three"], 3));
        assert_eq!(
            query::<u64>(
                &server,
                &["EXISTS", "lp:{d:nope}:inbox", "lp:{d:nope}:r:m9", "lp:m:m9"]
            ),
            0
        );
        assert_eq!(
            a.devices()
                .await
                .expect("devices")
                .iter()
                .map(|(d, n)| (d.device_id.as_str(), *n))
                .collect::<Vec<_>>(),
            [("d1", 2), ("d2", 0)]
        );

        // B holds d2: a forward hints B and does not make d2 due.
        let mut heard_b = b.subscribe();
        wait_subscribed(&server, "B").await;
        assert!(matches!(
            b.claim("d2", false).await.expect("claim"),
            Claimed::Mine { .. }
        ));
        let queued = a
            .forward("d2", b"cmd".to_vec(), None, 5, 10)
            .await
            .expect("forward");
        assert_eq!(
            queued,
            Forwarded::Queued {
                owner: Some("B".into())
            }
        );
        assert_eq!(
            heard(&mut heard_b, |h| matches!(h, Heard::Inbox { .. })).await,
            Heard::Inbox {
                device: "d2".into(),
                number: 1,
                command: b"cmd".to_vec()
            }
        );
        assert!(
            !a.due(i64::MAX / 4, 10)
                .await
                .expect("due")
                .contains(&"d2".to_string())
        );
        assert_eq!(b.inbox("d2").await.expect("inbox"), three(vec![b"cmd"], 1));
    }

    #[test]
    fn writes_a_later_op_of_the_same_script_overwrites_are_left_out() {
        let trim = Op::TrimInbox {
            device_id: "d1".into(),
            count: 1,
        };
        let ceiling = |ceiling| Op::PutSeqCeiling {
            device_id: "d1".into(),
            ceiling,
        };
        let ops = vec![
            ceiling(10),
            Op::PutPush(push("d1", 5)),
            trim.clone(),
            Op::PutReceipt(receipt("m5", "d1", ReceiptState::Delivered)),
            Op::PutPush(push("d1", 6)),
            Op::PutReceipt(receipt("m6", "d1", ReceiptState::Accepted)),
            ceiling(20),
            Op::DeletePush {
                device_id: "d1".into(),
                seq: 5,
            },
            Op::PutReceipt(receipt("m5", "d1", ReceiptState::Acked)),
            trim.clone(),
        ];
        let kept: Vec<&Op> = coalesce(&ops.iter().collect::<Vec<_>>());
        // Gone: the first ceiling, push 5's queue row and its DELIVERED receipt.
        let expected: Vec<&Op> = [2, 4, 5, 6, 7, 8, 9].iter().map(|&i| &ops[i]).collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn hints_carry_their_command_whatever_its_bytes() {
        let hint = [b"cmd:12:5:a:b:c".as_slice(), &[0, b':', 255]].concat();
        assert_eq!(
            parse_hint(&hint),
            Some(Heard::Inbox {
                device: "a:b:c".into(),
                number: 12,
                command: vec![0, b':', 255],
            })
        );
        assert_eq!(parse_hint(b"kick:d:1"), Some(Heard::Kick("d:1".into())));
        // An older node's hint names only the device: number 0 is never expected, so the
        // holder reads the inbox.
        assert_eq!(
            parse_hint(b"inbox:d1"),
            Some(Heard::Inbox {
                device: "d1".into(),
                number: 0,
                command: Vec::new(),
            })
        );
        for bad in [
            &b"cmd:1:9:short"[..],
            b"cmd:x:1:d",
            b"cmd:1",
            b"cmd:1:2",
            b"hello:d1",
            b"",
        ] {
            assert_eq!(parse_hint(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receipts_and_presence_are_announced() {
        let server = RedisServer::start().expect("redis-server starts");
        let a = fenced(&server, "A").await;
        let b = fenced(&server, "B").await;
        let mut heard_b = b.subscribe();
        wait_subscribed(&server, "B").await;
        let sent = receipt("m1", "d1", ReceiptState::Acked);
        a.announce(&[
            Announcement::Receipt(sent.clone()),
            Announcement::Presence(b"here".to_vec()),
        ])
        .await
        .expect("publish");
        // In one round trip, in order.
        assert_eq!(heard(&mut heard_b, |_| true).await, Heard::Receipt(sent));
        assert_eq!(
            heard(&mut heard_b, |_| true).await,
            Heard::Presence(b"here".to_vec())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_listener_resubscribes_after_a_lost_connection() {
        let server = RedisServer::start().expect("redis-server starts");
        let a = fenced(&server, "A").await;
        let mut heard_a = a.subscribe();
        wait_subscribed(&server, "A").await;
        let _: () = query(&server, &["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert_eq!(heard(&mut heard_a, |_| true).await, Heard::Resubscribed);
        wait_subscribed(&server, "A").await;
        a.announce(&[Announcement::Presence(b"again".to_vec())])
            .await
            .expect("publish");
        assert_eq!(
            heard(&mut heard_a, |_| true).await,
            Heard::Presence(b"again".to_vec())
        );
    }

    /// Regression: a Redis that accepts the pub/sub connection and never answers (paused,
    /// half-open) held the listener forever, so no hint reached the node again.
    #[tokio::test(start_paused = true)]
    async fn a_silent_redis_does_not_hold_the_listener_forever() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("redis://{}", silent.local_addr().expect("addr"));
        let (tx, _rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let listener = Listener {
            master: Master::open(&url, None).await.expect("master"),
            channels: vec!["lp:hint:A".into()],
            tx,
            stop: stop.clone(),
            lost: false,
        };
        tokio::spawn(listener.run());
        let mut held = Vec::new();
        for attempt in 1..=2 {
            let accepted = tokio::time::timeout(Duration::from_secs(60), silent.accept()).await;
            let (socket, _) = accepted
                .unwrap_or_else(|_| panic!("connection {attempt} never came"))
                .expect("accept");
            held.push(socket);
        }
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn epoch_is_kept_until_redis_loses_it() {
        let server = RedisServer::start().expect("redis-server starts");
        let first = RedisStore::connect(&server.url, "A", true)
            .await
            .expect("connect");
        let epoch = first.epoch();
        assert!((1..1 << 53).contains(&epoch));
        let second = RedisStore::connect(&server.url, "B", false)
            .await
            .expect("connect");
        assert_eq!(second.epoch(), epoch);
        assert_eq!(second.load().expect("load").epoch, epoch);
        assert_eq!(
            first.load().expect("load"),
            Snapshot {
                epoch,
                ..Snapshot::default()
            },
            "fenced: epoch only"
        );
        assert_eq!(first.current_epoch().await.expect("epoch"), Some(epoch));
        let _: () = query(&server, &["FLUSHALL"]);
        assert_eq!(first.current_epoch().await.expect("epoch"), None);
        let third = RedisStore::connect(&server.url, "C", false)
            .await
            .expect("connect");
        assert_ne!(third.epoch(), epoch, "an emptied Redis gets a new epoch");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receipts_and_requests_expire() {
        let server = RedisServer::start().expect("redis-server starts");
        let store = RedisStore::connect(&server.url, "A", false)
            .await
            .expect("connect");
        store.set_receipt_retention(60_000);
        use ReceiptState::*;
        commit(
            &*store,
            vec![
                Op::PutReceipt(receipt("m", "b", Accepted)),
                Op::PutReceipt(receipt("m", "a", Acked)),
                Op::PutRequest {
                    id: "r".into(),
                    record: RequestRecord {
                        kind: PushKind::Message,
                        digest: vec![1],
                        at_ms: 1,
                        expires_at_ms: 1,
                    },
                },
            ],
        )
        .await
        .expect("commit");
        let ttl = |key: &str| query::<i64>(&server, &["PTTL", key]);
        assert!(
            (1..=60_000).contains(&ttl("lp:{d:a}:r:m")),
            "a final receipt expires"
        );
        assert_eq!(ttl("lp:{d:b}:r:m"), -1, "a pending one does not");
        assert_eq!(
            ttl("lp:m:m"),
            -1,
            "the device set lives while a receipt is pending"
        );
        assert!((1..=60_000).contains(&ttl("lp:req:r")), "a request expires");
        commit(&*store, vec![Op::PutReceipt(receipt("m", "b", Delivered))])
            .await
            .expect("commit");
        assert_eq!(ttl("lp:m:m"), -1);
        commit(&*store, vec![Op::PutReceipt(receipt("m", "b", Expired))])
            .await
            .expect("commit");
        assert!(
            (1..=60_000).contains(&ttl("lp:m:m")),
            "all final: the device set expires too"
        );
        assert_eq!(
            store
                .receipts("m")
                .expect("receipts")
                .iter()
                .map(|r| r.device_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );

        store.set_receipt_retention(50);
        commit(
            &*store,
            vec![
                Op::PutReceipt(receipt("n", "a", Cancelled)),
                Op::PutRequest {
                    id: "s".into(),
                    record: RequestRecord {
                        kind: PushKind::Message,
                        digest: vec![1],
                        at_ms: 1,
                        expires_at_ms: 1,
                    },
                },
            ],
        )
        .await
        .expect("commit");
        assert_eq!(store.receipts("n").expect("receipts").len(), 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(store.receipts("n").expect("receipts").is_empty());
        assert_eq!(store.request("s").expect("request"), None);
        assert!(store.request("r").expect("request").is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn groups_follow_the_device_record() {
        let server = RedisServer::start().expect("redis-server starts");
        let store = RedisStore::connect(&server.url, "A", false)
            .await
            .expect("connect");
        commit(
            &*store,
            vec![
                Op::PutDevice(device("d1", &["x", "y"])),
                Op::PutDevice(device("d2", &["y"])),
            ],
        )
        .await
        .expect("commit");
        assert_eq!(store.group_members("y").await.expect("members"), ["d1", "d2"]);
        commit(
            &*store,
            vec![
                Op::PutDevice(device("d1", &["z"])),
                Op::PutDevice(device("d1", &["y", "w"])),
            ],
        )
        .await
        .expect("commit");
        assert_eq!(
            store.group_members("x").await.expect("members"),
            Vec::<String>::new()
        );
        assert_eq!(
            store.group_members("z").await.expect("members"),
            Vec::<String>::new()
        );
        assert_eq!(store.group_members("w").await.expect("members"), ["d1"]);
        assert_eq!(store.group_members("y").await.expect("members"), ["d1", "d2"]);
        assert!(store.create_device(&device("d3", &["w"])).await.expect("create"));
        assert_eq!(store.group_members("w").await.expect("members"), ["d1", "d3"]);
        assert_eq!(
            store.device("d3").await.expect("device"),
            Some((device("d3", &["w"]), 0))
        );
        assert_eq!(store.device("d4").await.expect("device"), None);

        // A record Redis cannot read fails the batch before anything is written.
        let _: () = query(&server, &["SET", "lp:{d:d2}:rec", "\u{7f}garbage"]);
        let failed = commit(
            &*store,
            vec![Op::PutPush(push("d2", 1)), Op::PutDevice(device("d2", &[]))],
        )
        .await;
        assert!(matches!(failed, Err(StoreError::Corrupt { .. })), "{failed:?}");
        assert_eq!(query::<u64>(&server, &["EXISTS", "lp:{d:d2}:q"]), 0);
    }
}
