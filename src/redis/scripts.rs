//! The Lua scripts of the shared tier. Each runs atomically in Redis, so a lookup that leases
//! the missing keys, or a rate-limit check that takes a slot, cannot interleave with another
//! process's. They are sent with `EVALSHA` and loaded again after a Redis restart (`NOSCRIPT`),
//! which [`redis::Script`] does by itself.
//!
//! The rate limiter reads Redis's own clock (`TIME`), so processes whose clocks disagree still
//! share one timeline. Numbers stay below 2^53 (microseconds since the epoch), which Lua's
//! doubles hold exactly; they are written back with `%.0f`, never in exponent form.

use std::{sync::LazyLock, time::Duration};

use ::redis::{RedisResult, Script, Value, aio::ConnectionManager};

/// Get each value, or lease it when it is missing and unleased.
///
/// `KEYS`: n value keys, then their n lease keys. `ARGV`: owner token, lease ms.
/// Returns one element per value key: the value (a string), `1` when the caller holds the
/// lease (just taken, or already its own), `0` when another owner holds it.
const LOOKUP: &str = r"
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  if v then
    out[i] = v
  elseif redis.call('SET', KEYS[n + i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  elseif redis.call('GET', KEYS[n + i]) == ARGV[1] then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
";

/// Write the values whose lease the caller still holds, and drop those leases.
///
/// `KEYS`: n value keys, then their n lease keys. `ARGV`: owner token, then for each key its
/// payload and its time to live in ms. Returns how many values were written.
///
/// Only the lease holder writes: a fetch whose lease was taken away (an invalidation deletes
/// the value and its lease, e.g. after an order) or expired and was taken over does not
/// overwrite what came after it; its own callers still get what it fetched.
const STORE: &str = r"
local n = #KEYS / 2
local c = 0
for i = 1, n do
  if redis.call('GET', KEYS[n + i]) == ARGV[1] then
    redis.call('SET', KEYS[i], ARGV[2 * i], 'PX', ARGV[2 * i + 1])
    redis.call('DEL', KEYS[n + i])
    c = c + 1
  end
end
return c
";

/// Extend the caller's leases to a new time to live, or drop them. `KEYS`: lease keys.
/// `ARGV`: owner token, then the lease ms (extend) or nothing (release).
const RENEW: &str = r"
local c = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    if ARGV[2] then
      redis.call('PEXPIRE', KEYS[i], ARGV[2])
    else
      redis.call('DEL', KEYS[i])
    end
    c = c + 1
  end
end
return c
";

/// GCRA over Redis's clock: take `cost` slots, or say how long to wait.
///
/// `KEYS`: tat, pause, ramp. `ARGV`: emission interval µs, burst, cost, force (`1`: take the
/// slots whatever the state, for requests already sent).
/// Returns 0 when admitted, else the wait in µs (nothing taken). While the pause key lives
/// (after a 429) nothing is admitted; while the ramp key lives the class runs at half rate
/// with a burst of 1, as the in-process limiter does.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local force = ARGV[4] == '1'
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 and not force then
  return pause * 1000
end
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
  interval = interval * 2
  burst = 1
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then
  tat = now
end
local new_tat = tat + interval * tonumber(ARGV[3])
local allow_at = new_tat - burst * interval
if allow_at > now and not force then
  return allow_at - now
end
local ttl_ms = math.floor((new_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
return 0
";

/// Pause a class for every process after a 429, then ramp it up.
///
/// `KEYS`: pause, ramp, strikes. `ARGV`: retry-after ms (`-1`: none), backoff base ms,
/// backoff max ms, ramp ms, jitter in thousandths (0..=250).
/// Without a retry-after the pause doubles with each 429 while the strikes key lives (until the
/// pause and ramp of the last one are over). A pause is only ever extended. Returns the pause
/// applied in ms.
const PENALIZE: &str = r"
local n = redis.call('INCR', KEYS[3])
local ra = tonumber(ARGV[1])
local maxms = tonumber(ARGV[3])
local rampms = tonumber(ARGV[4])
local pause
if ra >= 0 then
  pause = math.min(ra, maxms)
else
  local e = math.min(n - 1, 16)
  pause = math.min(tonumber(ARGV[2]) * (2 ^ e), maxms)
  pause = pause + math.floor(pause * tonumber(ARGV[5]) / 1000)
end
pause = math.max(math.floor(pause), 1)
redis.call('PEXPIRE', KEYS[3], string.format('%.0f', pause + rampms))
if redis.call('PTTL', KEYS[1]) < pause then
  redis.call('SET', KEYS[1], '1', 'PX', string.format('%.0f', pause))
end
if redis.call('PTTL', KEYS[2]) < pause + rampms then
  redis.call('SET', KEYS[2], '1', 'PX', string.format('%.0f', pause + rampms))
end
return pause
";

static LOOKUP_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LOOKUP));
static STORE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(STORE));
static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE));
static PENALIZE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PENALIZE));

/// One element of a [`lookup`] answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The stored bytes.
    Value(Vec<u8>),
    /// The caller holds the lease: it must fetch.
    Mine,
    /// Another owner holds the lease: wait for its value.
    Theirs,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Run [`LOOKUP`] over `keys` (value keys; their lease keys are derived).
pub(crate) async fn lookup(
    conn: &mut ConnectionManager,
    keys: &[String],
    leases: &[String],
    owner: &str,
    lease_ttl: Duration,
) -> RedisResult<Vec<Slot>> {
    let mut inv = LOOKUP_SCRIPT.prepare_invoke();
    for k in keys.iter().chain(leases) {
        inv.key(k);
    }
    inv.arg(owner).arg(ms(lease_ttl));
    let values: Vec<Value> = inv.invoke_async(conn).await?;
    if values.len() != keys.len() {
        return Err(unexpected("lookup answered the wrong number of elements"));
    }
    values
        .into_iter()
        .map(|v| match v {
            Value::BulkString(b) => Ok(Slot::Value(b)),
            Value::Int(1) => Ok(Slot::Mine),
            Value::Int(0) => Ok(Slot::Theirs),
            _ => Err(unexpected("lookup answered an unexpected element")),
        })
        .collect()
}

/// Run [`STORE`]: `items` are (value key, lease key, payload, time to live).
pub(crate) async fn store(
    conn: &mut ConnectionManager,
    items: &[(String, String, Vec<u8>, Duration)],
    owner: &str,
) -> RedisResult<()> {
    if items.is_empty() {
        return Ok(());
    }
    let mut inv = STORE_SCRIPT.prepare_invoke();
    for (k, _, _, _) in items {
        inv.key(k);
    }
    for (_, l, _, _) in items {
        inv.key(l);
    }
    inv.arg(owner);
    for (_, _, payload, ttl) in items {
        inv.arg(payload.as_slice()).arg(ms(*ttl));
    }
    let _: i64 = inv.invoke_async(conn).await?;
    Ok(())
}

/// Drop the caller's `leases` ([`RENEW`] without a time to live).
pub(crate) async fn release(conn: &mut ConnectionManager, leases: &[String], owner: &str) -> RedisResult<()> {
    renew(conn, leases, owner, None).await
}

/// Extend the caller's `leases` to `lease_ttl` ([`RENEW`]).
pub(crate) async fn extend(
    conn: &mut ConnectionManager,
    leases: &[String],
    owner: &str,
    lease_ttl: Duration,
) -> RedisResult<()> {
    renew(conn, leases, owner, Some(lease_ttl)).await
}

async fn renew(
    conn: &mut ConnectionManager,
    leases: &[String],
    owner: &str,
    lease_ttl: Option<Duration>,
) -> RedisResult<()> {
    if leases.is_empty() {
        return Ok(());
    }
    let mut inv = RENEW_SCRIPT.prepare_invoke();
    for l in leases {
        inv.key(l);
    }
    inv.arg(owner);
    if let Some(ttl) = lease_ttl {
        inv.arg(ms(ttl));
    }
    let _: i64 = inv.invoke_async(conn).await?;
    Ok(())
}

/// The parameters of one [`acquire`] call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gcra {
    /// Time between two slots at the steady rate.
    pub(crate) interval: Duration,
    /// Slots that may go at once after a quiet period.
    pub(crate) burst: u32,
}

/// Run [`ACQUIRE`]: `Ok(None)` when admitted, `Ok(Some(wait))` otherwise. `keys` are the
/// class's `[tat, pause, ramp, ..]`.
pub(crate) async fn acquire(
    conn: &mut ConnectionManager,
    keys: &[String; 4],
    gcra: Gcra,
    cost: u32,
    force: bool,
) -> RedisResult<Option<Duration>> {
    let interval_us = u64::try_from(gcra.interval.as_micros()).unwrap_or(u64::MAX).max(1);
    let wait_us: i64 = ACQUIRE_SCRIPT
        .key(&keys[0])
        .key(&keys[1])
        .key(&keys[2])
        .arg(interval_us)
        .arg(gcra.burst.max(1))
        .arg(cost)
        .arg(if force { "1" } else { "0" })
        .invoke_async(conn)
        .await?;
    Ok((wait_us > 0).then(|| Duration::from_micros(wait_us.unsigned_abs())))
}

/// The backoff settings of [`penalize`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
    pub(crate) ramp: Duration,
}

/// Run [`PENALIZE`]; returns the pause applied. `keys` are the class's `[_, pause, ramp, strikes]`.
pub(crate) async fn penalize(
    conn: &mut ConnectionManager,
    keys: &[String; 4],
    retry_after: Option<Duration>,
    backoff: Backoff,
) -> RedisResult<Duration> {
    let ra: i64 = retry_after.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let jitter = fastrand::u32(0..=250);
    let pause_ms: i64 = PENALIZE_SCRIPT
        .key(&keys[1])
        .key(&keys[2])
        .key(&keys[3])
        .arg(ra)
        .arg(ms(backoff.base))
        .arg(ms(backoff.max))
        .arg(u64::try_from(backoff.ramp.as_millis()).unwrap_or(u64::MAX))
        .arg(jitter)
        .invoke_async(conn)
        .await?;
    Ok(Duration::from_millis(pause_ms.unsigned_abs()))
}

fn unexpected(what: &'static str) -> ::redis::RedisError {
    ::redis::RedisError::from((::redis::ErrorKind::Client, what))
}
