//! [`MigrationFlags`]: which bots use the coordinated path, decided per bot id.
//!
//! The flags move bots from the legacy [`DirectSource`](crate::DirectSource) to the
//! [`CoordinatedSource`](crate::CoordinatedSource) gradually (an allowlist, then a percentage)
//! and reversibly (one switch sends every bot back). They are plain data: read them from the
//! environment at start-up ([`MigrationFlags::from_env`]) or from a JSON file that the
//! [`SourceSelector`](crate::SourceSelector) can re-read while the bots run.
//!
//! # How the percentage rollout hashes
//! A bot's rollout bucket is `fnv1a64(bot_id) % 100` ([`rollout_bucket`]), where `fnv1a64` is
//! the 64-bit FNV-1a hash of the id's UTF-8 bytes. The bot is migrated when its bucket is
//! below `rollout_percent`. The hash is written out in this file rather than taken from
//! `std` (whose `DefaultHasher` may change between Rust versions and whose `RandomState` is
//! seeded per process), so a bot keeps its bucket across restarts, hosts, platforms and
//! compiler upgrades, and so the rule is easy to reproduce in another language:
//!
//! ```text
//! h = 0xcbf29ce484222325
//! for byte in utf8(bot_id): h = ((h ^ byte) * 0x100000001b3) mod 2^64
//! bucket = h mod 100
//! ```
//!
//! Because the threshold only rises with the percentage, the rollout is monotonic: a bot
//! migrated at `p` % stays migrated at every `q > p`, and lowering the percentage moves back
//! exactly the bots that the last increase moved.

use std::{collections::BTreeSet, path::Path};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, truncate};

/// Which path serves one bot's market data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// The legacy [`DirectSource`](crate::DirectSource): every call goes to the exchange.
    Legacy,
    /// The [`CoordinatedSource`](crate::CoordinatedSource): cached, coalesced, batched,
    /// rate-limited.
    Coordinated,
    /// Served by the legacy path while the coordinated path answers the same calls for
    /// comparison only (see [`ShadowSource`](crate::ShadowSource)).
    Shadow,
}

impl Route {
    /// Every route, in declaration order.
    pub const ALL: [Route; 3] = [Route::Legacy, Route::Coordinated, Route::Shadow];

    /// The name used in JSON and logs (`"legacy"`, `"coordinated"`, `"shadow"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Route::Legacy => "legacy",
            Route::Coordinated => "coordinated",
            Route::Shadow => "shadow",
        }
    }
}

/// The migration switches: which bots read market data through the coordinated path.
///
/// # Precedence
/// [`route`](MigrationFlags::route) applies the first matching row:
///
/// | # | condition                                       | route         |
/// |---|-------------------------------------------------|---------------|
/// | 1 | `enabled == false`                              | `Legacy`      |
/// | 2 | the bot is in `bot_ids`                         | `Coordinated` |
/// | 3 | `rollout_bucket(bot) < rollout_percent`         | `Coordinated` |
/// | 4 | the bot is in `shadow_bot_ids`                  | `Shadow`      |
/// | 5 | otherwise                                       | `Legacy`      |
///
/// So `enabled` is the global switch and the kill switch: while it is off, nothing else
/// matters. A bot both migrated (rows 2 or 3) and listed for shadowing is `Coordinated`:
/// migrated wins, since shadowing exists to gain confidence before migrating. Bot ids are
/// compared exactly (case-sensitive, no trimming at lookup; parsing trims the lists).
///
/// | `enabled` | `bot_ids` | `rollout_percent` | `shadow_bot_ids` | bot `a`       | bot `b`  |
/// |-----------|-----------|-------------------|------------------|---------------|----------|
/// | false     | {a}       | 100               | {b}              | Legacy        | Legacy   |
/// | true      | {a}       | 0                 | {}               | Coordinated   | Legacy   |
/// | true      | {}        | 100               | {b}              | Coordinated   | Coordinated |
/// | true      | {a}       | 0                 | {a, b}           | Coordinated   | Shadow   |
///
/// # Example
/// ```
/// use tickshare::{MigrationFlags, Route};
/// let flags = MigrationFlags::from_lookup(|var| match var {
///     "USE_COORDINATED_API_CALLS" => Some("true".into()),
///     "COORDINATED_BOT_IDS" => Some("bot-1, bot-2".into()),
///     _ => None,
/// })?;
/// assert_eq!(flags.route("bot-1"), Route::Coordinated);
/// assert_eq!(flags.route("bot-3"), Route::Legacy);
/// assert_eq!(MigrationFlags::default().route("bot-1"), Route::Legacy);
/// # Ok::<(), tickshare::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationFlags {
    /// The global switch, env `USE_COORDINATED_API_CALLS`. Off by default; while off every
    /// bot is legacy whatever the other fields say.
    pub enabled: bool,
    /// Bots migrated by name, env `COORDINATED_BOT_IDS`.
    pub bot_ids: BTreeSet<String>,
    /// Percentage of all bots migrated by their [`rollout_bucket`], 0 to 100, env
    /// `COORDINATED_ROLLOUT_PERCENT`. Values above 100 are rejected by
    /// [`validate`](MigrationFlags::validate) and act as 100 in
    /// [`route`](MigrationFlags::route).
    pub rollout_percent: u8,
    /// Bots run in shadow mode when not migrated, env `COORDINATED_SHADOW_BOT_IDS`.
    pub shadow_bot_ids: BTreeSet<String>,
}

impl MigrationFlags {
    /// The environment variable of [`enabled`](MigrationFlags::enabled).
    pub const ENV_ENABLED: &'static str = "USE_COORDINATED_API_CALLS";
    /// The environment variable of [`bot_ids`](MigrationFlags::bot_ids) (comma-separated).
    pub const ENV_BOT_IDS: &'static str = "COORDINATED_BOT_IDS";
    /// The environment variable of [`rollout_percent`](MigrationFlags::rollout_percent) (an
    /// integer from 0 to 100).
    pub const ENV_ROLLOUT_PERCENT: &'static str = "COORDINATED_ROLLOUT_PERCENT";
    /// The environment variable of [`shadow_bot_ids`](MigrationFlags::shadow_bot_ids)
    /// (comma-separated).
    pub const ENV_SHADOW_BOT_IDS: &'static str = "COORDINATED_SHADOW_BOT_IDS";

    /// The route of `bot_id` under these flags (see the precedence table on the type).
    pub fn route(&self, bot_id: &str) -> Route {
        if !self.enabled {
            Route::Legacy
        } else if self.bot_ids.contains(bot_id) || rollout_bucket(bot_id) < self.rollout_percent {
            Route::Coordinated
        } else if self.shadow_bot_ids.contains(bot_id) {
            Route::Shadow
        } else {
            Route::Legacy
        }
    }

    /// The same flags with the global switch off: every bot legacy, everything else kept so
    /// that turning the switch back on restores the previous routing.
    #[must_use]
    pub fn disabled(&self) -> Self {
        MigrationFlags { enabled: false, ..self.clone() }
    }

    /// Read the flags from the process environment (`USE_COORDINATED_API_CALLS`,
    /// `COORDINATED_BOT_IDS`, `COORDINATED_ROLLOUT_PERCENT`, `COORDINATED_SHADOW_BOT_IDS`).
    /// See [`from_lookup`](MigrationFlags::from_lookup) for the syntax.
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable and its value when a variable is set to
    /// something invalid or is not valid Unicode.
    pub fn from_env() -> Result<Self> {
        for var in [Self::ENV_ENABLED, Self::ENV_BOT_IDS, Self::ENV_ROLLOUT_PERCENT, Self::ENV_SHADOW_BOT_IDS]
        {
            if let Err(std::env::VarError::NotUnicode(v)) = std::env::var(var) {
                return Err(bad_value(var, &v.to_string_lossy(), "is not valid Unicode"));
            }
        }
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// Read the flags through `lookup`, which maps a variable name to its value (`None` when
    /// unset). [`from_env`](MigrationFlags::from_env) passes the process environment; tests
    /// and hosts with their own configuration store pass a closure.
    ///
    /// Syntax, all values trimmed of surrounding whitespace; a variable that is unset or
    /// blank takes its default:
    /// - `USE_COORDINATED_API_CALLS`: `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, any
    ///   case. Default `false`.
    /// - `COORDINATED_BOT_IDS`, `COORDINATED_SHADOW_BOT_IDS`: ids separated by commas; spaces
    ///   around ids, empty items (`"a,,b"`, a trailing comma) and duplicates are ignored.
    ///   Default: no bot. (An empty list is no bot, not one bot named `""`.)
    /// - `COORDINATED_ROLLOUT_PERCENT`: an integer from 0 to 100. Default 0.
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable and its value when a boolean or the percentage
    /// does not parse, or the percentage is above 100.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |var: &str| lookup(var).filter(|v| !v.trim().is_empty());
        let enabled = match get(Self::ENV_ENABLED) {
            Some(v) => parse_bool(Self::ENV_ENABLED, &v)?,
            None => false,
        };
        let rollout_percent = match get(Self::ENV_ROLLOUT_PERCENT) {
            Some(v) => parse_percent(Self::ENV_ROLLOUT_PERCENT, &v)?,
            None => 0,
        };
        let flags = MigrationFlags {
            enabled,
            bot_ids: get(Self::ENV_BOT_IDS).map(|v| parse_ids(&v)).unwrap_or_default(),
            rollout_percent,
            shadow_bot_ids: get(Self::ENV_SHADOW_BOT_IDS).map(|v| parse_ids(&v)).unwrap_or_default(),
        };
        flags.validate()?;
        Ok(flags)
    }

    /// Check values the types allow but the flags do not.
    ///
    /// # Errors
    /// [`Error::Config`] when `rollout_percent` is above 100, or a bot id in `bot_ids` or
    /// `shadow_bot_ids` is empty, has surrounding whitespace or contains a comma (it could
    /// not be written in the environment variables, and an empty id is the seed's bug of
    /// migrating a bot named `""`).
    pub fn validate(&self) -> Result<()> {
        if self.rollout_percent > 100 {
            return Err(Error::Config(format!(
                "rollout_percent is {}; it must be from 0 to 100",
                self.rollout_percent
            )));
        }
        for (field, ids) in [("bot_ids", &self.bot_ids), ("shadow_bot_ids", &self.shadow_bot_ids)] {
            for id in ids {
                if id.trim().is_empty() || id.trim() != id || id.contains(',') {
                    return Err(Error::Config(format!(
                        "{field} contains the bot id \"{}\"; ids must be non-empty, without surrounding whitespace or commas",
                        truncate(&id.escape_debug().to_string(), 64)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Parse and validate flags from JSON, for example
    /// `{"enabled": true, "bot_ids": ["bot-1"], "rollout_percent": 10, "shadow_bot_ids": []}`.
    /// Missing fields take their defaults; unknown fields are refused, so a misspelt switch
    /// is an error rather than silently ignored.
    ///
    /// # Errors
    /// [`Error::Config`] when the text is not such a JSON object or the flags are invalid
    /// ([`validate`](MigrationFlags::validate)).
    pub fn from_json_str(json: &str) -> Result<Self> {
        let flags: MigrationFlags = serde_json::from_str(json)
            .map_err(|e| Error::Config(format!("invalid migration flags JSON: {e}")))?;
        flags.validate()?;
        Ok(flags)
    }

    /// Read flags from a JSON file (see [`from_json_str`](MigrationFlags::from_json_str)).
    ///
    /// # Errors
    /// [`Error::Config`] naming the file when it cannot be read, is not valid UTF-8 JSON of
    /// the flags, or holds invalid flags.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read migration flags file {}: {e}", path.display()))
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }
}

/// The 64-bit FNV-1a hash of `bytes` (offset basis `0xcbf29ce484222325`, prime
/// `0x100000001b3`), as published by Fowler, Noll and Vo. Fixed forever: the rollout depends
/// on it.
pub(crate) const fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET_BASIS;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(PRIME);
        i += 1;
    }
    h
}

/// The rollout bucket of a bot, `fnv1a64(bot_id) % 100`, in `0..100`. The bot is migrated by
/// the percentage rollout when its bucket is below
/// [`rollout_percent`](MigrationFlags::rollout_percent).
///
/// We take the low digits (`% 100`) and not the high bits (`h * 100 >> 64`): FNV-1a mixes the
/// last bytes of a string poorly into the high bits, and ids such as `bot-1 .. bot-9999`
/// then spread 5 to 12 points off the target percentage, against under half a point for
/// `% 100` (measured on several id shapes; the unit tests check it).
///
/// ```
/// assert_eq!(tickshare::rollout_bucket("bot-1"), 8);
/// ```
pub const fn rollout_bucket(bot_id: &str) -> u8 {
    // The remainder is below 100, so the cast cannot truncate.
    (fnv1a64(bot_id.as_bytes()) % 100) as u8
}

fn bad_value(var: &str, value: &str, why: &str) -> Error {
    Error::Config(format!("{var}=\"{}\" {why}", truncate(&value.escape_debug().to_string(), 64)))
}

fn parse_bool(var: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(bad_value(var, value, "is not a boolean; use true/false, 1/0, yes/no or on/off")),
    }
}

fn parse_percent(var: &str, value: &str) -> Result<u8> {
    match value.trim().parse::<u8>() {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(bad_value(var, value, "is not a percentage; use a whole number from 0 to 100")),
    }
}

fn parse_ids(value: &str) -> BTreeSet<String> {
    value.split(',').map(str::trim).filter(|id| !id.is_empty()).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const ENV_ENABLED: &str = MigrationFlags::ENV_ENABLED;
    const ENV_BOT_IDS: &str = MigrationFlags::ENV_BOT_IDS;
    const ENV_ROLLOUT_PERCENT: &str = MigrationFlags::ENV_ROLLOUT_PERCENT;
    const ENV_SHADOW_BOT_IDS: &str = MigrationFlags::ENV_SHADOW_BOT_IDS;

    fn env(pairs: &[(&str, &str)]) -> Result<MigrationFlags> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        MigrationFlags::from_lookup(move |k| map.get(k).cloned())
    }

    fn ids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flag_parsing_table() {
        // (variables, expected enabled, bot ids, percent, shadow ids)
        type Row<'a> = (&'a [(&'a str, &'a str)], bool, &'a [&'a str], u8, &'a [&'a str]);
        let rows: &[Row<'_>] = &[
            (&[], false, &[], 0, &[]),
            (&[(ENV_ENABLED, "")], false, &[], 0, &[]),
            (&[(ENV_ENABLED, "  ")], false, &[], 0, &[]),
            (&[(ENV_ENABLED, "true")], true, &[], 0, &[]),
            (&[(ENV_ENABLED, " TRUE ")], true, &[], 0, &[]),
            (&[(ENV_ENABLED, "1")], true, &[], 0, &[]),
            (&[(ENV_ENABLED, "Yes")], true, &[], 0, &[]),
            (&[(ENV_ENABLED, "on")], true, &[], 0, &[]),
            (&[(ENV_ENABLED, "False")], false, &[], 0, &[]),
            (&[(ENV_ENABLED, "0")], false, &[], 0, &[]),
            (&[(ENV_ENABLED, "no")], false, &[], 0, &[]),
            (&[(ENV_ENABLED, "OFF")], false, &[], 0, &[]),
            (&[(ENV_BOT_IDS, "")], false, &[], 0, &[]),
            (&[(ENV_BOT_IDS, " , ,")], false, &[], 0, &[]),
            (&[(ENV_BOT_IDS, "a")], false, &["a"], 0, &[]),
            (&[(ENV_BOT_IDS, " a , b ")], false, &["a", "b"], 0, &[]),
            (&[(ENV_BOT_IDS, "a,,b")], false, &["a", "b"], 0, &[]),
            (&[(ENV_BOT_IDS, "a,b,a,b,")], false, &["a", "b"], 0, &[]),
            (&[(ENV_BOT_IDS, "Bot-A,bot-a")], false, &["Bot-A", "bot-a"], 0, &[]),
            (&[(ENV_ROLLOUT_PERCENT, "")], false, &[], 0, &[]),
            (&[(ENV_ROLLOUT_PERCENT, "0")], false, &[], 0, &[]),
            (&[(ENV_ROLLOUT_PERCENT, " 25 ")], false, &[], 25, &[]),
            (&[(ENV_ROLLOUT_PERCENT, "100")], false, &[], 100, &[]),
            (&[(ENV_SHADOW_BOT_IDS, "s1, s2,,s1")], false, &[], 0, &["s1", "s2"]),
            (
                &[
                    (ENV_ENABLED, "true"),
                    (ENV_BOT_IDS, "a"),
                    (ENV_ROLLOUT_PERCENT, "5"),
                    (ENV_SHADOW_BOT_IDS, "b"),
                    ("UNRELATED", "x"),
                ],
                true,
                &["a"],
                5,
                &["b"],
            ),
        ];
        for (vars, enabled, bots, percent, shadow) in rows {
            let f = env(vars).unwrap_or_else(|e| panic!("{vars:?}: {e}"));
            assert_eq!(f.enabled, *enabled, "{vars:?}");
            assert_eq!(f.bot_ids, ids(bots), "{vars:?}");
            assert_eq!(f.rollout_percent, *percent, "{vars:?}");
            assert_eq!(f.shadow_bot_ids, ids(shadow), "{vars:?}");
        }
    }

    #[test]
    fn invalid_flag_values_name_the_variable_and_value() {
        let rows: &[(&str, &str)] = &[
            (ENV_ENABLED, "maybe"),
            (ENV_ENABLED, "tru"),
            (ENV_ENABLED, "2"),
            (ENV_ROLLOUT_PERCENT, "101"),
            (ENV_ROLLOUT_PERCENT, "x"),
            (ENV_ROLLOUT_PERCENT, "-1"),
            (ENV_ROLLOUT_PERCENT, "50%"),
            (ENV_ROLLOUT_PERCENT, "12.5"),
            (ENV_ROLLOUT_PERCENT, "256"),
        ];
        for (var, value) in rows {
            let err = env(&[(var, value)]).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{var}={value}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(var), "{msg}");
            assert!(msg.contains(&format!("\"{value}\"")), "{msg}");
        }
    }

    /// The seed split `COORDINATED_BOT_IDS=""` into `[""]` and reported one migrated bot.
    #[test]
    fn regression_seed_counted_empty_bot_ids_as_one_migrated_bot() {
        for value in ["", " ", ",", " , "] {
            let f = env(&[(ENV_ENABLED, "true"), (ENV_BOT_IDS, value)]).unwrap();
            assert!(f.bot_ids.is_empty(), "{value:?}");
            assert_eq!(f.route(""), Route::Legacy, "{value:?}");
        }
        // Nor can a JSON file smuggle the empty id in.
        let err = MigrationFlags::from_json_str(r#"{"enabled": true, "bot_ids": [""]}"#).unwrap_err();
        assert!(err.to_string().contains("bot_ids"), "{err}");
    }

    #[test]
    fn routing_precedence_table() {
        let f = |enabled: bool, bots: &[&str], percent: u8, shadow: &[&str]| MigrationFlags {
            enabled,
            bot_ids: ids(bots),
            rollout_percent: percent,
            shadow_bot_ids: ids(shadow),
        };
        // "bot-1" is in bucket 8 and "bot-2" in bucket 41 (see the test vectors below).
        let rows: Vec<(MigrationFlags, &str, Route)> = vec![
            // Row 1: the global switch beats everything.
            (f(false, &["bot-1"], 100, &["bot-1"]), "bot-1", Route::Legacy),
            (f(false, &[], 100, &[]), "bot-2", Route::Legacy),
            (f(false, &[], 0, &["bot-2"]), "bot-2", Route::Legacy),
            // Row 2: the allowlist.
            (f(true, &["bot-1"], 0, &[]), "bot-1", Route::Coordinated),
            (f(true, &["bot-1"], 0, &[]), "bot-2", Route::Legacy),
            (f(true, &["bot-1"], 0, &[]), "BOT-1", Route::Legacy),
            // Row 3: the percentage (bucket < percent).
            (f(true, &[], 8, &[]), "bot-1", Route::Legacy),
            (f(true, &[], 9, &[]), "bot-1", Route::Coordinated),
            (f(true, &[], 41, &[]), "bot-2", Route::Legacy),
            (f(true, &[], 42, &[]), "bot-2", Route::Coordinated),
            (f(true, &[], 100, &[]), "bot-2", Route::Coordinated),
            // Migrated wins over shadow.
            (f(true, &["bot-1"], 0, &["bot-1"]), "bot-1", Route::Coordinated),
            (f(true, &[], 100, &["bot-1"]), "bot-1", Route::Coordinated),
            // Row 4: shadow.
            (f(true, &["bot-1"], 0, &["bot-2"]), "bot-2", Route::Shadow),
            (f(true, &[], 30, &["bot-2"]), "bot-2", Route::Shadow),
            // Row 5: everyone else.
            (f(true, &[], 0, &["bot-2"]), "bot-1", Route::Legacy),
            (MigrationFlags::default(), "bot-1", Route::Legacy),
        ];
        for (flags, bot, route) in rows {
            assert_eq!(flags.route(bot), route, "{bot} under {flags:?}");
        }
        // Out-of-range percentages act as 100.
        assert_eq!(f(true, &[], 250, &[]).route("bot-2"), Route::Coordinated);
    }

    #[test]
    fn fnv1a64_reference_vectors() {
        // From the FNV reference test suite (isthe.com/chongo/tech/comp/fnv).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Fixed buckets: if this test fails, the hash changed and bots would switch paths
    /// on upgrade.
    #[test]
    fn rollout_buckets_are_stable_test_vectors() {
        let vectors: &[(&str, u8)] =
            &[("bot-1", 8), ("bot-2", 41), ("bot-42", 83), ("momentum-btc-usd", 32), ("", 37), ("élan", 52)];
        for (id, bucket) in vectors {
            assert_eq!(rollout_bucket(id), *bucket, "{id:?}");
        }
        let flags = MigrationFlags { enabled: true, rollout_percent: 40, ..Default::default() };
        let routes: Vec<Route> = vectors.iter().map(|(id, _)| flags.route(id)).collect();
        use Route::{Coordinated as C, Legacy as L};
        assert_eq!(routes, [C, L, L, C, C, L]);
    }

    #[test]
    fn rollout_is_monotonic_and_close_to_the_percentage() {
        for shape in ["bot-{}", "{}", "trader_{}_btc"] {
            let buckets: Vec<u8> =
                (0..10_000).map(|i| rollout_bucket(&shape.replace("{}", &i.to_string()))).collect();
            let mut previous: Option<Vec<bool>> = None;
            for p in 0..=100u8 {
                let flags = MigrationFlags { enabled: true, rollout_percent: p, ..Default::default() };
                let migrated: Vec<bool> = (0..10_000)
                    .map(|i| flags.route(&shape.replace("{}", &i.to_string())) == Route::Coordinated)
                    .collect();
                // Same decision as the bucket rule.
                assert!(migrated.iter().zip(&buckets).all(|(m, b)| *m == (*b < p)), "{shape} at {p}");
                // Subset of the next percentage: once migrated, always migrated.
                if let Some(prev) = &previous {
                    assert!(
                        prev.iter().zip(&migrated).all(|(was, is)| !was || *is),
                        "{shape}: a bot migrated at {}% is legacy at {p}%",
                        p - 1
                    );
                }
                let n = migrated.iter().filter(|m| **m).count() as i64;
                let target = i64::from(p) * 100;
                assert!((n - target).abs() <= 200, "{shape} at {p}%: {n} of 10000 migrated");
                previous = Some(migrated);
            }
        }
    }

    #[test]
    fn json_round_trip_defaults_and_errors() {
        let f = MigrationFlags::from_json_str(
            r#"{"enabled": true, "bot_ids": ["b", "a", "a"], "rollout_percent": 7}"#,
        )
        .unwrap();
        assert!(f.enabled);
        assert_eq!(f.bot_ids, ids(&["a", "b"]));
        assert_eq!(f.rollout_percent, 7);
        assert!(f.shadow_bot_ids.is_empty());
        let back = MigrationFlags::from_json_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        assert_eq!(MigrationFlags::from_json_str("{}").unwrap(), MigrationFlags::default());
        for (bad, says) in [
            ("not json", "invalid migration flags JSON"),
            (r#"{"enabled": "yes"}"#, "invalid migration flags JSON"),
            (r#"{"rollout_pct": 5}"#, "rollout_pct"),
            (r#"{"rollout_percent": 101}"#, "rollout_percent is 101"),
            (r#"{"rollout_percent": 300}"#, "invalid migration flags JSON"),
            (r#"{"shadow_bot_ids": [" a"]}"#, "shadow_bot_ids"),
            (r#"{"bot_ids": ["a,b"]}"#, "bot_ids"),
        ] {
            let err = MigrationFlags::from_json_str(bad).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad}");
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
        assert_eq!(serde_json::to_string(&Route::Coordinated).unwrap(), "\"coordinated\"");
        for r in Route::ALL {
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{}\"", r.as_str()));
        }
    }

    #[test]
    fn json_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tickshare-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(&good, r#"{"enabled": true, "rollout_percent": 10}"#).unwrap();
        assert_eq!(MigrationFlags::from_json_file(&good).unwrap().rollout_percent, 10);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        let err = MigrationFlags::from_json_file(&bad).unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
        let missing = dir.join("missing.json");
        let err = MigrationFlags::from_json_file(&missing).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert!(err.to_string().contains("missing.json"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn disabled_keeps_everything_but_the_switch() {
        let f = MigrationFlags {
            enabled: true,
            bot_ids: ids(&["a"]),
            rollout_percent: 50,
            shadow_bot_ids: ids(&["b"]),
        };
        let off = f.disabled();
        assert!(!off.enabled);
        assert_eq!(off.route("a"), Route::Legacy);
        assert_eq!(MigrationFlags { enabled: true, ..off }, f);
    }
}
