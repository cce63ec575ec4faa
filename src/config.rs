//! Server configuration (SPEC §12): the embedded default, then an optional
//! TOML file, then `SCAIWAVE_*` environment overrides, each beating the last.
//!
//! The file is parsed into a plain [`toml::Table`], environment overrides are
//! written into that table as TOML values, and one hand-written walk then
//! reads every key it knows. Walking by hand instead of deriving
//! `Deserialize` is what lets every error name the exact dotted key
//! (`federation.retry_intial`) or environment variable at fault and say what
//! was expected; `main` prints the [`ConfigError`] and exits 2.
//!
//! Nothing here reads the process environment: the caller passes the
//! variables in, so only `main` touches `std::env` and tests stay hermetic.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::{Table, Value};

use crate::ids::ServerName;

/// The whole configuration, validated: holding one means every value and
/// every relation between values has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Default `localhost:<listen port>` (plain `localhost` for port 443).
    pub server_name: ServerName,
    /// Default `127.0.0.1:8448`.
    pub listen: SocketAddr,
    /// Default `./scaiwave-data`, relative to the working directory.
    pub data_dir: PathBuf,
    pub tls: TlsConfig,
    pub federation: FederationConfig,
    pub audit: AuditConfig,
    pub limits: LimitsConfig,
    pub storage: StorageConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    /// `None` leaves calls disabled (SPEC §14).
    pub livekit: Option<LivekitConfig>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsConfig {
    /// Both set or both `None`; `None` means a self-signed certificate kept in
    /// `data_dir`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Extra CA PEM files trusted for peers, on top of the system roots.
    pub trust_roots: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FederationConfig {
    pub enabled: bool,
    pub generate_key_on_start: bool,
    pub key_rotation_interval: Duration,
    /// May be zero: the old key then stops verifying at rotation.
    pub key_overlap: Duration,
    pub max_clock_skew: Duration,
    /// Never more than `retry_max_interval`.
    pub retry_initial: Duration,
    pub retry_max_interval: Duration,
    pub retry_max_age: Duration,
    pub invite_ttl: Duration,
    pub allow_private_addresses: bool,
    /// Exact server_name (port included) → address to dial. File only: the
    /// keys are server names, which cannot be spelled in variable names, so
    /// `SCAIWAVE_FEDERATION__RESOLVE*` is refused rather than half-supported.
    pub resolve: BTreeMap<ServerName, SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    pub retention: Duration,
}

/// What one client may hold of the listener (SPEC §12 `[limits]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// A connection must deliver a whole request head within this.
    pub request_head_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A request body must arrive within this once it is being read.
    pub request_body_timeout: Duration,
    pub connections_max: usize,
    pub connections_per_ip_max: usize,
    /// Signed S2S requests per origin server (burst: twice the rate).
    pub rate_per_origin: Rate,
    /// Local API requests per bearer token (burst: twice the rate).
    pub rate_per_token: Rate,
}

/// `N/s`, `N/m` or `N/h`: so many requests per second, minute or hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            3600 => "h",
            60 => "m",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    /// Resident bytes for sled's page cache: the bulk of the server's
    /// memory (sled itself is given less; see `SLED_CACHE_RESIDENT_FACTOR`).
    pub cache_capacity: u64,
    /// What an accepted write waits for (SPEC §11).
    pub sync: StorageSync,
}

/// `[storage] sync` (SPEC §11): how durable "accepted" is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorageSync {
    /// sled's flush, then an `fdatasync` of the database file shared by
    /// every waiting request: survives a power cut.
    #[default]
    Fsync,
    /// sled's flush only (`sync_file_range`): survives a process crash,
    /// not a power cut or a kernel crash.
    Flush,
}

fn storage_sync(v: &Value) -> Result<StorageSync, String> {
    match v.as_str() {
        Some("fsync") => Ok(StorageSync::Fsync),
        Some("flush") => Ok(StorageSync::Flush),
        _ => Err(format!(
            "expected \"fsync\" (survives a power cut) or \"flush\" (survives a crash), got {}",
            describe(v)
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` (SPEC §16) is served over plain HTTP; `None`
    /// (the default, `""` in the file) serves none.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lets `--log-format` share the spelling of `log.format`.
impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("expected \"text\" or \"json\", got {s:?}")),
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct LivekitConfig {
    pub url: String,
    pub api_key: String,
    pub api_secret: String,
}

// Hand-written so that logging a `Config` with `{:?}` cannot leak the secret.
impl fmt::Debug for LivekitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LivekitConfig")
            .field("url", &self.url)
            .field("api_key", &self.api_key)
            .field("api_secret", &"<redacted>")
            .finish()
    }
}

/// A configuration that cannot be used. `key` is the dotted key
/// (`federation.retry_initial`; resolve entries as
/// `federation.resolve."b.example.com"`), the environment variable when the
/// variable itself is unknown, or `config` when the file cannot be read or
/// is not TOML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error in `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8448);
const DEFAULT_DATA_DIR: &str = "./scaiwave-data";
const DAY: u64 = 24 * 3600;
const MIB: u64 = 1024 * 1024;

// Far beyond any sensible setting, yet small enough that `Instant + d` and
// `SystemTime + d` can never overflow (which would panic) downstream.
const DURATION_MAX: Duration = Duration::from_secs(36_500 * DAY);

const MUST_BE_POSITIVE: &str = "must be greater than 0s";

const ENV_PREFIX: &str = "SCAIWAVE_";
/// Variables in our namespace that are not configuration keys: the config
/// file path and the log filter, both read by `main`.
const ENV_NOT_KEYS: [&str; 2] = ["SCAIWAVE_CONFIG", "SCAIWAVE_LOG"];

/// How an environment value becomes a TOML value. Everything stays a string
/// (the typed walk parses it) except what TOML itself types differently.
#[derive(Clone, Copy, PartialEq)]
enum EnvForm {
    Text,
    Bool,
    Integer,
    CommaList,
    FileOnly,
}

const SECTIONS: [&str; 8] = [
    "tls",
    "federation",
    "audit",
    "limits",
    "storage",
    "metrics",
    "log",
    "livekit",
];

/// Every key of SPEC §12 by section (`""` is the top level). The typed walk
/// below must read exactly these; a test holds the two together.
const KEYS: &[(&str, &str, EnvForm)] = &[
    ("", "server_name", EnvForm::Text),
    ("", "listen", EnvForm::Text),
    ("", "data_dir", EnvForm::Text),
    ("tls", "cert", EnvForm::Text),
    ("tls", "key", EnvForm::Text),
    ("tls", "trust_roots", EnvForm::CommaList),
    ("federation", "enabled", EnvForm::Bool),
    ("federation", "generate_key_on_start", EnvForm::Bool),
    ("federation", "key_rotation_interval", EnvForm::Text),
    ("federation", "key_overlap", EnvForm::Text),
    ("federation", "max_clock_skew", EnvForm::Text),
    ("federation", "retry_initial", EnvForm::Text),
    ("federation", "retry_max_interval", EnvForm::Text),
    ("federation", "retry_max_age", EnvForm::Text),
    ("federation", "invite_ttl", EnvForm::Text),
    ("federation", "allow_private_addresses", EnvForm::Bool),
    ("federation", "resolve", EnvForm::FileOnly),
    ("audit", "retention", EnvForm::Text),
    ("limits", "request_head_timeout", EnvForm::Text),
    ("limits", "idle_timeout", EnvForm::Text),
    ("limits", "request_body_timeout", EnvForm::Text),
    ("limits", "connections_max", EnvForm::Integer),
    ("limits", "connections_per_ip_max", EnvForm::Integer),
    ("limits", "rate_per_origin", EnvForm::Text),
    ("limits", "rate_per_token", EnvForm::Text),
    ("storage", "cache_capacity", EnvForm::Text),
    ("storage", "sync", EnvForm::Text),
    ("metrics", "listen", EnvForm::Text),
    ("log", "format", EnvForm::Text),
    ("livekit", "url", EnvForm::Text),
    ("livekit", "api_key", EnvForm::Text),
    ("livekit", "api_secret", EnvForm::Text),
];

impl Config {
    /// The embedded default (no file, no environment).
    pub fn default_embedded() -> Config {
        Config {
            server_name: default_server_name(DEFAULT_LISTEN)
                .expect("the default listen port yields a valid server name"),
            listen: DEFAULT_LISTEN,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            tls: TlsConfig::default(),
            federation: FederationConfig {
                enabled: true,
                generate_key_on_start: true,
                key_rotation_interval: Duration::from_secs(365 * DAY),
                key_overlap: Duration::from_secs(30 * DAY),
                max_clock_skew: Duration::from_secs(60),
                retry_initial: Duration::from_secs(2),
                retry_max_interval: Duration::from_secs(3600),
                retry_max_age: Duration::from_secs(DAY),
                invite_ttl: Duration::from_secs(7 * DAY),
                allow_private_addresses: false,
                resolve: BTreeMap::new(),
            },
            audit: AuditConfig {
                retention: Duration::from_secs(90 * DAY),
            },
            limits: LimitsConfig {
                request_head_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                request_body_timeout: Duration::from_secs(30),
                connections_max: 4096,
                connections_per_ip_max: 256,
                rate_per_origin: Rate {
                    count: 300,
                    per: Duration::from_secs(1),
                },
                rate_per_token: Rate {
                    count: 20,
                    per: Duration::from_secs(1),
                },
            },
            storage: StorageConfig {
                cache_capacity: crate::limits::CACHE_CAPACITY_BYTES_DEFAULT,
                sync: StorageSync::Fsync,
            },
            metrics: MetricsConfig::default(),
            log: LogConfig {
                format: LogFormat::Text,
            },
            livekit: None,
        }
    }

    /// Builds the configuration from optional TOML text and then the
    /// environment. `env` is every variable of the process (pass
    /// `std::env::vars()`); those outside `SCAIWAVE_*` are ignored, as are
    /// `SCAIWAVE_CONFIG` and `SCAIWAVE_LOG`, and any other `SCAIWAVE_*` name
    /// must be a key. `federation.resolve` cannot be set from the environment.
    pub fn load(
        toml_text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut root = match toml_text {
            Some(text) => text.parse::<Table>().map_err(|e| {
                ConfigError::new(
                    "config",
                    format!("not valid TOML: {}", e.to_string().trim_end()),
                )
            })?,
            None => Table::new(),
        };
        let from_env = apply_env(&mut root, env)?;
        Walker { from_env }.config(&root)
    }

    /// [`Config::load`] with the text of `path`.
    pub fn from_file(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        Config::load(Some(&text), env).map_err(|mut e| {
            if e.key == "config" {
                e.message = format!("{}: {}", path.display(), e.message);
            }
            e
        })
    }
}

/// A duration as the shortest exact `1d 2h 3m 4s` string, which
/// `humantime::parse_duration` reads back to the same value.
/// `humantime::format_duration` is not used because it counts in 30.44-day
/// months and 365.25-day years, so the default `365d` would print as
/// `11months 30days 3h 50m 24s`.
pub fn humantime_string(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let parts = [
        (secs / DAY, "d"),
        (secs % DAY / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
        (u64::from(nanos / 1_000_000), "ms"),
        (u64::from(nanos / 1_000 % 1_000), "us"),
        (u64::from(nanos % 1_000), "ns"),
    ];
    let out: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if out.is_empty() {
        "0s".to_string()
    } else {
        out.join(" ")
    }
}

/// A commented configuration file naming every key. Active lines carry the
/// defaults, so copying it changes nothing until edited; optional settings
/// are commented out.
pub const EXAMPLE_TOML: &str = r#"# ScaiWave server configuration (SPEC §12).
#
# Every key is optional; active values below are the defaults. Durations are
# written like 60s, 15m, 24h, 365d (units can be combined: "1h 30m").
#
# Environment variables beat this file: SCAIWAVE_SERVER_NAME,
# SCAIWAVE_LISTEN, SCAIWAVE_DATA_DIR, and any other key as
# SCAIWAVE_<SECTION>__<KEY>, e.g. SCAIWAVE_FEDERATION__KEY_OVERLAP=7d.
# Unknown keys and unknown SCAIWAVE_* variables are errors.

# The lower-case DNS name, with an optional :port (never :443), that peers
# reach this server at: https://<server_name>. It is part of every id this
# server mints, so choose it once.
# Default: "localhost:<listen port>".
# server_name = "chat.example.com"

# The address HTTPS (federation and the local API) is served on.
listen = "127.0.0.1:8448"

# Database, signing keys, the self-signed certificate and the first admin
# token (admin-token, mode 0600) live here.
data_dir = "./scaiwave-data"

[tls]
# PEM certificate chain and private key. Set both or neither: with neither,
# a self-signed certificate is created in data_dir on first start.
# cert = "/etc/scaiwave/cert.pem"
# key = "/etc/scaiwave/key.pem"

# Extra CA certificates (PEM files) trusted for peers, on top of the system
# roots; for private networks and tests. In the environment, comma separated:
# SCAIWAVE_TLS__TRUST_ROOTS=/etc/scaiwave/a.pem,/etc/scaiwave/b.pem
trust_roots = []

[federation]
# false: no traffic with other servers at all.
enabled = true

# Create the signing key on first start. false leaves it to
# `scaiwave admin federation key generate`.
generate_key_on_start = true

# The signing key is rotated this often; the previous key keeps verifying
# for key_overlap afterwards (0s: not at all).
key_rotation_interval = "365d"
key_overlap = "30d"

# Signed requests and events whose time is further than this from ours are
# refused. Keep clocks in sync (NTP) rather than raising it.
max_clock_skew = "60s"

# Backoff towards an unreachable peer: the first retry after retry_initial,
# doubling (with jitter) up to retry_max_interval between attempts.
# retry_initial may not exceed retry_max_interval.
retry_initial = "2s"
retry_max_interval = "1h"

# An event still undelivered this long after it was queued is dropped and
# audited as federation.send.failed.
retry_max_age = "24h"

# How long an invitation can be accepted before it expires on both sides.
invite_ttl = "7d"

# Peers are never dialled at private, loopback, link-local or multicast
# addresses unless this is true or they are listed in [federation.resolve].
allow_private_addresses = false

# Fixed addresses, bypassing DNS: exact server_name (port included) = the
# socket address to dial. TLS SNI is still the host part of the name.
# File only: this table cannot be set from the environment.
[federation.resolve]
# "b.example.com" = "127.0.0.1:9449"

[audit]
# Audit rows older than this are deleted.
retention = "90d"

[limits]
# What one client may hold of this server. A connection must send a whole
# request head within request_head_timeout, is closed after idle_timeout
# with no request, and a body must arrive within request_body_timeout;
# a slow one is closed without an answer.
request_head_timeout = "10s"
idle_timeout = "60s"
request_body_timeout = "30s"
# Connections past these are closed as they are accepted.
connections_max = 4096
connections_per_ip_max = 256
# Requests per second (/s), minute (/m) or hour (/h), with bursts of twice
# that: signed requests per origin server, local API calls per token.
# Past them: 429 SW_FED_RATE_LIMITED with Retry-After.
rate_per_origin = "300/s"
rate_per_token = "20/s"

[storage]
# Memory for sled's page cache: more serves big rooms' history from
# memory, less fits a small box. With the default, ingesting 200 000
# events peaked at 128 MiB; the rest of the server's memory grows with the
# database (docs/operations.md, "Memory").
cache_capacity = "64MiB"
# What an accepted ("200") request waits for: "fsync" also waits for an
# fdatasync of the database, shared by all waiting requests, and survives
# a power cut; "flush" survives a crash of the process only, and is faster.
sync = "fsync"

[metrics]
# Prometheus text on plain HTTP at http://<listen>/metrics (never on the
# federation port). "" serves none; several servers on one machine each
# need their own port.
listen = ""

[log]
# "text" for people, "json" for machines. --log-format overrides it; the
# SCAIWAVE_LOG variable sets the filter (e.g. info,scaiwave=debug).
format = "text"

# LiveKit, for call tokens (SPEC §14). Without this section calls are off.
# With it, url, api_key and api_secret are all required. Consider passing
# the secret as SCAIWAVE_LIVEKIT__API_SECRET instead of writing it here.
# [livekit]
# url = "wss://livekit.example.com"
# api_key = "APIxxxxxxxxxxxx"
# api_secret = "change-me"
"#;

/// `a.b`, quoting the last part when TOML would have to (resolve entries
/// are server names, full of dots), so error keys can be pasted back.
fn join(prefix: &str, name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let name = if bare {
        name.to_string()
    } else {
        format!("{name:?}")
    };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}.{name}")
    }
}

fn env_name(section: &str, name: &str) -> String {
    if section.is_empty() {
        format!("{ENV_PREFIX}{}", name.to_ascii_uppercase())
    } else {
        format!(
            "{ENV_PREFIX}{}__{}",
            section.to_ascii_uppercase(),
            name.to_ascii_uppercase()
        )
    }
}

/// Writes `SCAIWAVE_*` overrides into `root` and returns, for each key set,
/// the variable that set it, so errors about its value can point there.
fn apply_env(
    root: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    // Sorted and deduplicated (the last value of a name wins), so that with
    // several bad variables the error reported does not depend on the order
    // the OS lists them in.
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX) && !ENV_NOT_KEYS.contains(&name.as_str()))
        .collect();
    let mut from_env = BTreeMap::new();
    for (var, value) in vars {
        let Some(&(section, name, form)) = KEYS
            .iter()
            .find(|(section, name, _)| env_name(section, name) == var)
        else {
            if var.starts_with("SCAIWAVE_FEDERATION__RESOLVE") {
                return Err(file_only(&var));
            }
            return Err(unknown_env(&var));
        };
        let value = match form {
            EnvForm::FileOnly => return Err(file_only(&var)),
            EnvForm::Text => Value::String(value),
            // Anything but the two literals stays a string, for the walk to
            // reject with the usual "expected true or false".
            EnvForm::Bool => match value.as_str() {
                "true" => Value::Boolean(true),
                "false" => Value::Boolean(false),
                _ => Value::String(value),
            },
            // Likewise: not a number stays a string, refused by the walk.
            EnvForm::Integer => match value.parse::<i64>() {
                Ok(n) => Value::Integer(n),
                Err(_) => Value::String(value),
            },
            // An empty variable is an empty list, so the file's list can be
            // cleared from the environment.
            EnvForm::CommaList if value.is_empty() => Value::Array(Vec::new()),
            EnvForm::CommaList => Value::Array(
                value
                    .split(',')
                    .map(|item| Value::String(item.trim().to_string()))
                    .collect(),
            ),
        };
        let table = if section.is_empty() {
            &mut *root
        } else {
            match root
                .entry(section)
                .or_insert_with(|| Value::Table(Table::new()))
            {
                Value::Table(t) => t,
                _ => return Err(not_a_table(section)),
            }
        };
        table.insert(name.to_string(), value);
        from_env.insert(join(section, name), var);
    }
    Ok(from_env)
}

fn file_only(var: &str) -> ConfigError {
    ConfigError::new(
        var,
        "federation.resolve cannot be set from the environment (its keys are server names, \
         which variable names cannot spell); put the entries under [federation.resolve] in \
         the config file",
    )
}

fn unknown_env(var: &str) -> ConfigError {
    let known: Vec<String> = KEYS
        .iter()
        .filter(|(_, _, form)| *form != EnvForm::FileOnly)
        .map(|(section, name, _)| env_name(section, name))
        .collect();
    let hint = match closest(var, known.iter().map(String::as_str)) {
        Some(near) => format!("did you mean {near}?"),
        None => "SCAIWAVE_* variables set configuration keys: SCAIWAVE_SERVER_NAME, \
                 SCAIWAVE_LISTEN, SCAIWAVE_DATA_DIR, or SCAIWAVE_<SECTION>__<KEY> such as \
                 SCAIWAVE_FEDERATION__KEY_OVERLAP"
            .to_string(),
    };
    ConfigError::new(
        var,
        format!("unknown environment variable; {hint} (unset it if it is not meant for scaiwave)"),
    )
}

fn not_a_table(key: &str) -> ConfigError {
    ConfigError::new(key, format!("expected a table, written as [{key}]"))
}

/// The candidate nearest to `word` if it is plausibly a typo of it.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(word, c), c))
        // Short words are close to everything; demand the typo be small
        // relative to them so `bogus` does not suggest `log`.
        .filter(|(d, c)| *d <= 3 && d * 3 <= word.len().min(c.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// What a value is, for "got …" in messages. Never the contents of strings
/// that may be secrets; see `describe` for the rest.
fn type_of(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Integer(i) => format!("the integer {i}"),
        Value::Boolean(b) => format!("{b}"),
        other => type_of(other).to_string(),
    }
}

// Value parsers: each returns what was expected on failure; the walk adds
// the key.

fn duration(v: &Value) -> Result<Duration, String> {
    const EXPECTED: &str = "expected a duration like 60s, 24h, 365d";
    let s = v
        .as_str()
        .ok_or_else(|| format!("{EXPECTED} (a quoted string), got {}", describe(v)))?;
    let d = humantime::parse_duration(s).map_err(|e| format!("{EXPECTED}, got {s:?} ({e})"))?;
    if d > DURATION_MAX {
        return Err(format!(
            "{s:?} is too long; at most {}",
            humantime_string(DURATION_MAX)
        ));
    }
    Ok(d)
}

/// A count of at least 1 (connection caps).
fn count(v: &Value) -> Result<usize, String> {
    match v.as_integer() {
        Some(n) if n >= 1 && n <= u32::MAX as i64 => Ok(n as usize),
        _ => Err(format!(
            "expected a whole number of at least 1, got {}",
            describe(v)
        )),
    }
}

const RATE_EXPECTED: &str = "expected a rate like 300/s, 600/m or 1000/h";

fn rate(v: &Value) -> Result<Rate, String> {
    v.as_str()
        .ok_or_else(|| format!("{RATE_EXPECTED} (a quoted string), got {}", describe(v)))?
        .parse()
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Rate, String> {
        parse_rate(s).ok_or_else(|| format!("{RATE_EXPECTED}, got {s:?}"))
    }
}

fn parse_rate(s: &str) -> Option<Rate> {
    s.split_once('/').and_then(|(n, unit)| {
        let count = n.trim().parse::<u32>().ok().filter(|n| *n >= 1)?;
        let per = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return None,
        };
        Some(Rate {
            count,
            per: Duration::from_secs(per),
        })
    })
}

fn boolean(v: &Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("expected true or false, got {}", describe(v)))
}

fn socket_addr(v: &Value) -> Result<SocketAddr, String> {
    v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
        format!(
            "expected a socket address like 127.0.0.1:8448 or [::1]:8448, got {}",
            describe(v)
        )
    })
}

/// `"64MiB"`: a whole number of B, KiB, MiB or GiB (binary units, as
/// memory is counted), or a bare integer of bytes.
fn byte_size(v: &Value) -> Result<u64, String> {
    const EXPECTED: &str = "expected a size such as \"64MiB\" (units B, KiB, MiB, GiB)";
    let text = match v {
        Value::Integer(n) => return u64::try_from(*n).map_err(|_| format!("{EXPECTED}, got {n}")),
        Value::String(s) => s.trim(),
        other => return Err(format!("{EXPECTED}, got {}", describe(other))),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => MIB,
        "GiB" => 1024 * MIB,
        _ => return Err(format!("{EXPECTED}, got {text:?}")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{EXPECTED}, got {text:?}"))
}

/// A socket address, or `""` for none.
fn optional_socket_addr(v: &Value) -> Result<Option<SocketAddr>, String> {
    match v {
        Value::String(s) if s.is_empty() => Ok(None),
        other => socket_addr(other).map(Some),
    }
}

fn path(v: &Value) -> Result<PathBuf, String> {
    match v.as_str() {
        Some(s) if !s.is_empty() => Ok(PathBuf::from(s)),
        _ => Err(format!("expected a file path, got {}", describe(v))),
    }
}

fn paths(v: &Value) -> Result<Vec<PathBuf>, String> {
    let items = v.as_array().ok_or_else(|| {
        format!(
            "expected a list of file paths like [\"/etc/scaiwave/ca.pem\"], got {}",
            describe(v)
        )
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| path(item).map_err(|e| format!("entry {}: {e}", i + 1)))
        .collect()
}

fn server_name(v: &Value) -> Result<ServerName, String> {
    let s = v.as_str().ok_or_else(|| {
        format!(
            "expected a server name like chat.example.com, got {}",
            describe(v)
        )
    })?;
    ServerName::parse(s).map_err(|e| e.message)
}

fn log_format(v: &Value) -> Result<LogFormat, String> {
    match v.as_str() {
        Some(s) => s.parse(),
        None => Err(format!(
            "expected \"text\" or \"json\", got {}",
            describe(v)
        )),
    }
}

/// Livekit credentials: checked for presence only, and never echoed.
fn secret_text(v: &Value) -> Result<String, String> {
    match v.as_str() {
        Some("") => Err("must not be empty".to_string()),
        Some(s) => Ok(s.to_string()),
        None => Err(format!("expected a string, got {}", type_of(v))),
    }
}

fn livekit_url(v: &Value) -> Result<String, String> {
    let expected = "expected a URL like wss://livekit.example.com";
    let s = v
        .as_str()
        .ok_or_else(|| format!("{expected}, got {}", describe(v)))?;
    let ok = ["ws://", "wss://", "http://", "https://"]
        .iter()
        .any(|scheme| s.len() > scheme.len() && s.starts_with(scheme));
    if !ok {
        return Err(format!("{expected}, got {s:?}"));
    }
    Ok(s.to_string())
}

fn default_server_name(listen: SocketAddr) -> Result<ServerName, ConfigError> {
    let name = match listen.port() {
        // The OS picks the port at bind time, after configuration is final.
        0 => {
            return Err(ConfigError::new(
                "server_name",
                "required when listen has port 0: the default, localhost:<listen port>, \
                 cannot be known before the OS picks the port",
            ))
        }
        443 => "localhost".to_string(),
        port => format!("localhost:{port}"),
    };
    ServerName::parse(&name).map_err(|e| ConfigError::new("server_name", e.message))
}

/// The typed walk over the merged table.
struct Walker {
    /// Dotted key → the variable that set it.
    from_env: BTreeMap<String, String>,
}

impl Walker {
    fn err(&self, key: &str, message: String) -> ConfigError {
        match self.from_env.get(key) {
            Some(var) => ConfigError::new(key, format!("{message} (set by {var})")),
            None => ConfigError::new(key, message),
        }
    }

    /// Refuses any key of `table` that SPEC §12 doesn't define for `section`.
    fn known_keys(&self, table: &Table, section: &str) -> Result<(), ConfigError> {
        let mut allowed: Vec<&str> = KEYS
            .iter()
            .filter(|(s, _, _)| *s == section)
            .map(|(_, name, _)| *name)
            .collect();
        if section.is_empty() {
            allowed.extend(SECTIONS);
        }
        let Some(unknown) = table.keys().find(|k| !allowed.contains(&k.as_str())) else {
            return Ok(());
        };
        let key = join(section, unknown);
        let hint = match closest(unknown, allowed.iter().copied()) {
            Some(near) => format!("did you mean `{}`?", join(section, near)),
            None if section.is_empty() => format!(
                "the top level has {} and the sections {}",
                KEYS.iter()
                    .filter(|(s, _, _)| s.is_empty())
                    .map(|(_, n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
                SECTIONS.map(|s| format!("[{s}]")).join(", ")
            ),
            None => format!("[{section}] has {}", allowed.join(", ")),
        };
        Err(self.err(&key, format!("unknown key; {hint}")))
    }

    fn section<'a>(&self, root: &'a Table, name: &str) -> Result<Option<&'a Table>, ConfigError> {
        match root.get(name) {
            None => Ok(None),
            Some(Value::Table(t)) => {
                self.known_keys(t, name)?;
                Ok(Some(t))
            }
            Some(_) => Err(not_a_table(name)),
        }
    }

    /// The parsed value of `section.name`, or `None` if absent.
    fn get<T>(
        &self,
        table: Option<&Table>,
        section: &str,
        name: &str,
        parse: fn(&Value) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match table.and_then(|t| t.get(name)) {
            None => Ok(None),
            Some(v) => parse(v)
                .map(Some)
                .map_err(|m| self.err(&join(section, name), m)),
        }
    }

    fn config(&self, root: &Table) -> Result<Config, ConfigError> {
        let d = Config::default_embedded();
        self.known_keys(root, "")?;
        let top = Some(root);

        let listen = self
            .get(top, "", "listen", socket_addr)?
            .unwrap_or(d.listen);
        let server_name = match self.get(top, "", "server_name", server_name)? {
            Some(name) => name,
            None => default_server_name(listen)?,
        };
        let data_dir = self.get(top, "", "data_dir", path)?.unwrap_or(d.data_dir);

        let tls = self.tls(root)?;
        let federation = self.federation(root, d.federation)?;

        let a = self.section(root, "audit")?;
        let audit = AuditConfig {
            retention: self
                .get(a, "audit", "retention", duration)?
                .unwrap_or(d.audit.retention),
        };
        // Zero would delete every audit row as it is written.
        if audit.retention.is_zero() {
            return Err(self.err("audit.retention", MUST_BE_POSITIVE.to_string()));
        }

        let limits = self.limits(root, d.limits)?;

        let st = self.section(root, "storage")?;
        let storage = StorageConfig {
            cache_capacity: self
                .get(st, "storage", "cache_capacity", byte_size)?
                .unwrap_or(d.storage.cache_capacity),
            sync: self
                .get(st, "storage", "sync", storage_sync)?
                .unwrap_or(d.storage.sync),
        };
        if storage.cache_capacity < MIB {
            return Err(self.err(
                "storage.cache_capacity",
                format!(
                    "{} bytes is too small for sled's page cache; use at least \"1MiB\" \
                     (the default is \"64MiB\")",
                    storage.cache_capacity
                ),
            ));
        }

        let m = self.section(root, "metrics")?;
        let metrics = MetricsConfig {
            listen: self
                .get(m, "metrics", "listen", optional_socket_addr)?
                .flatten(),
        };
        if metrics.listen == Some(listen) && listen.port() != 0 {
            return Err(self.err(
                "metrics.listen",
                format!(
                    "{listen} is also `listen`: metrics are plain HTTP and never share the \
                     federation port; pick another port, e.g. 127.0.0.1:9448"
                ),
            ));
        }

        let l = self.section(root, "log")?;
        let log = LogConfig {
            format: self
                .get(l, "log", "format", log_format)?
                .unwrap_or(d.log.format),
        };

        let livekit = self.livekit(root)?;

        Ok(Config {
            server_name,
            listen,
            data_dir,
            tls,
            federation,
            audit,
            limits,
            storage,
            metrics,
            log,
            livekit,
        })
    }

    fn limits(&self, root: &Table, d: LimitsConfig) -> Result<LimitsConfig, ConfigError> {
        const S: &str = "limits";
        let t = self.section(root, S)?;
        let dur = |name: &str, default: Duration| -> Result<Duration, ConfigError> {
            let d = self.get(t, S, name, duration)?.unwrap_or(default);
            // Zero would close every connection at once.
            if d.is_zero() {
                return Err(self.err(&join(S, name), MUST_BE_POSITIVE.to_string()));
            }
            Ok(d)
        };
        let limits = LimitsConfig {
            request_head_timeout: dur("request_head_timeout", d.request_head_timeout)?,
            idle_timeout: dur("idle_timeout", d.idle_timeout)?,
            request_body_timeout: dur("request_body_timeout", d.request_body_timeout)?,
            connections_max: self
                .get(t, S, "connections_max", count)?
                .unwrap_or(d.connections_max),
            connections_per_ip_max: self
                .get(t, S, "connections_per_ip_max", count)?
                .unwrap_or(d.connections_per_ip_max),
            rate_per_origin: self
                .get(t, S, "rate_per_origin", rate)?
                .unwrap_or(d.rate_per_origin),
            rate_per_token: self
                .get(t, S, "rate_per_token", rate)?
                .unwrap_or(d.rate_per_token),
        };
        if limits.connections_per_ip_max > limits.connections_max {
            return Err(self.err(
                "limits.connections_per_ip_max",
                format!(
                    "{} exceeds limits.connections_max ({}); one address can never hold more \
                     than all of them",
                    limits.connections_per_ip_max, limits.connections_max
                ),
            ));
        }
        Ok(limits)
    }

    fn tls(&self, root: &Table) -> Result<TlsConfig, ConfigError> {
        let t = self.section(root, "tls")?;
        let tls = TlsConfig {
            cert: self.get(t, "tls", "cert", path)?,
            key: self.get(t, "tls", "key", path)?,
            trust_roots: self
                .get(t, "tls", "trust_roots", paths)?
                .unwrap_or_default(),
        };
        // A certificate without its key (or the reverse) is a half-edited
        // file, not a request for the self-signed fallback.
        match (&tls.cert, &tls.key) {
            (Some(_), None) => Err(self.err(
                "tls.key",
                "missing: tls.cert is set, so tls.key is required too (or remove both to use a \
                 self-signed certificate)"
                    .to_string(),
            )),
            (None, Some(_)) => Err(self.err(
                "tls.cert",
                "missing: tls.key is set, so tls.cert is required too (or remove both to use a \
                 self-signed certificate)"
                    .to_string(),
            )),
            _ => Ok(tls),
        }
    }

    fn federation(
        &self,
        root: &Table,
        d: FederationConfig,
    ) -> Result<FederationConfig, ConfigError> {
        const S: &str = "federation";
        let f = self.section(root, S)?;
        let dur = |name: &str, default: Duration| -> Result<Duration, ConfigError> {
            Ok(self.get(f, S, name, duration)?.unwrap_or(default))
        };
        let flag = |name: &str, default: bool| -> Result<bool, ConfigError> {
            Ok(self.get(f, S, name, boolean)?.unwrap_or(default))
        };
        let fed = FederationConfig {
            enabled: flag("enabled", d.enabled)?,
            generate_key_on_start: flag("generate_key_on_start", d.generate_key_on_start)?,
            key_rotation_interval: dur("key_rotation_interval", d.key_rotation_interval)?,
            key_overlap: dur("key_overlap", d.key_overlap)?,
            max_clock_skew: dur("max_clock_skew", d.max_clock_skew)?,
            retry_initial: dur("retry_initial", d.retry_initial)?,
            retry_max_interval: dur("retry_max_interval", d.retry_max_interval)?,
            retry_max_age: dur("retry_max_age", d.retry_max_age)?,
            invite_ttl: dur("invite_ttl", d.invite_ttl)?,
            allow_private_addresses: flag("allow_private_addresses", d.allow_private_addresses)?,
            resolve: self.resolve(f)?,
        };
        // Zero would mean: rotate constantly, accept no clock difference,
        // retry in a busy loop, drop at once, or expire invites as they are
        // sent. A zero key_overlap is merely strict, so it is allowed.
        for (name, value) in [
            ("key_rotation_interval", fed.key_rotation_interval),
            ("max_clock_skew", fed.max_clock_skew),
            ("retry_initial", fed.retry_initial),
            ("retry_max_interval", fed.retry_max_interval),
            ("retry_max_age", fed.retry_max_age),
            ("invite_ttl", fed.invite_ttl),
        ] {
            if value.is_zero() {
                return Err(self.err(&join(S, name), MUST_BE_POSITIVE.to_string()));
            }
        }
        if fed.retry_initial > fed.retry_max_interval {
            return Err(self.err(
                "federation.retry_initial",
                format!(
                    "{} exceeds federation.retry_max_interval ({}); backoff starts at \
                     retry_initial and grows up to retry_max_interval",
                    humantime_string(fed.retry_initial),
                    humantime_string(fed.retry_max_interval)
                ),
            ));
        }
        Ok(fed)
    }

    fn resolve(&self, f: Option<&Table>) -> Result<BTreeMap<ServerName, SocketAddr>, ConfigError> {
        let mut out = BTreeMap::new();
        let entries = match f.and_then(|f| f.get("resolve")) {
            None => return Ok(out),
            Some(Value::Table(t)) => t,
            Some(_) => return Err(not_a_table("federation.resolve")),
        };
        for (name, addr) in entries {
            let key = join("federation.resolve", name);
            let server = ServerName::parse(name).map_err(|e| {
                self.err(
                    &key,
                    format!(
                        "keys of [federation.resolve] must be exact server names: {}",
                        e.message
                    ),
                )
            })?;
            let addr = socket_addr(addr).map_err(|m| self.err(&key, m))?;
            out.insert(server, addr);
        }
        Ok(out)
    }

    fn livekit(&self, root: &Table) -> Result<Option<LivekitConfig>, ConfigError> {
        const S: &str = "livekit";
        let Some(t) = self.section(root, S)? else {
            return Ok(None);
        };
        // Present but incomplete is refused rather than read as "calls off":
        // the operator evidently meant to turn calls on.
        let required = |name: &str, parse: fn(&Value) -> Result<String, String>| {
            self.get(Some(t), S, name, parse)?.ok_or_else(|| {
                self.err(
                    &join(S, name),
                    "missing: when [livekit] is present, url, api_key and api_secret are all \
                     required"
                        .to_string(),
                )
            })
        };
        Ok(Some(LivekitConfig {
            url: required("url", livekit_url)?,
            api_key: required("api_key", secret_text)?,
            api_secret: required("api_secret", secret_text)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(toml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(Some(toml), env(vars))
    }

    fn err_key(toml: &str, vars: &[(&str, &str)]) -> String {
        let e = load(toml, vars).expect_err("configuration should be refused");
        assert!(!e.message.is_empty());
        e.key
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// SPEC §12's own example, every key set.
    const FULL: &str = r#"
server_name = "a.example.com"
listen = "0.0.0.0:8448"
data_dir = "/var/lib/scaiwave"
[tls]
cert = "/etc/scaiwave/cert.pem"
key = "/etc/scaiwave/key.pem"
trust_roots = ["/etc/scaiwave/peer-ca.pem"]
[federation]
enabled = false
generate_key_on_start = false
key_rotation_interval = "180d"
key_overlap = "0s"
max_clock_skew = "2m"
retry_initial = "5s"
retry_max_interval = "30m"
retry_max_age = "48h"
invite_ttl = "1d 12h"
allow_private_addresses = true
[federation.resolve]
"b.example.com" = "127.0.0.1:9449"
"c.test:8443" = "[::1]:8443"
[audit]
retention = "30d"
[limits]
request_head_timeout = "5s"
idle_timeout = "2m"
request_body_timeout = "20s"
connections_max = 1000
connections_per_ip_max = 50
rate_per_origin = "1000/m"
rate_per_token = "5/s"
[storage]
cache_capacity = "16MiB"
sync = "flush"
[metrics]
listen = "127.0.0.1:9448"
[log]
format = "json"
[livekit]
url = "wss://livekit.example.com"
api_key = "APIkey"
api_secret = "s3cret"
"#;

    #[test]
    fn storage_and_metrics_keys() {
        let d = Config::default_embedded();
        assert_eq!(
            (d.storage.cache_capacity, d.metrics.listen),
            (64 * MIB, None)
        );
        for (text, bytes) in [
            ("\"1GiB\"", 1024 * MIB),
            ("\"512KiB\"", MIB / 2),
            ("\"2 MiB\"", 2 * MIB),
            ("8388608", 8 * MIB),
        ] {
            let c = load(&format!("[storage]\ncache_capacity = {text}"), &[]);
            assert_eq!(
                c.map(|c| c.storage.cache_capacity).ok(),
                Some(bytes).filter(|b| *b >= MIB),
                "{text}"
            );
        }
        for bad in [
            "\"64MB\"",
            "\"lots\"",
            "-1",
            "\"1KiB\"",
            "\"99999999999GiB\"",
        ] {
            assert_eq!(
                err_key(&format!("[storage]\ncache_capacity = {bad}"), &[]),
                "storage.cache_capacity",
                "{bad}"
            );
        }
        let c = load("", &[("SCAIWAVE_STORAGE__CACHE_CAPACITY", "32MiB")]).unwrap();
        assert_eq!(c.storage.cache_capacity, 32 * MIB);
        assert_eq!(d.storage.sync, StorageSync::Fsync, "power-safe by default");
        let c = load("[storage]\nsync = \"flush\"", &[]).unwrap();
        assert_eq!(c.storage.sync, StorageSync::Flush);
        let c = load("", &[("SCAIWAVE_STORAGE__SYNC", "fsync")]).unwrap();
        assert_eq!(c.storage.sync, StorageSync::Fsync);
        for bad in ["\"fdatasync\"", "true", "\"\""] {
            assert_eq!(
                err_key(&format!("[storage]\nsync = {bad}"), &[]),
                "storage.sync",
                "{bad}"
            );
        }
        let c = load("", &[("SCAIWAVE_METRICS__LISTEN", "127.0.0.1:9500")]).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9500".parse().unwrap()));
        let c = load("[metrics]\nlisten = \"\"", &[]).unwrap();
        assert_eq!(c.metrics.listen, None);
        for bad in [
            "[metrics]\nlisten = \"nowhere\"",
            "[metrics]\nlisten = \"127.0.0.1:8448\"",
        ] {
            assert_eq!(err_key(bad, &[]), "metrics.listen", "{bad}");
        }
    }

    #[test]
    fn embedded_default_values() {
        let c = Config::default_embedded();
        assert_eq!(c.server_name.as_str(), "localhost:8448");
        assert_eq!(c.listen, "127.0.0.1:8448".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("./scaiwave-data"));
        assert_eq!(c.tls, TlsConfig::default());
        let f = &c.federation;
        assert!(f.enabled && f.generate_key_on_start && !f.allow_private_addresses);
        assert_eq!(f.key_rotation_interval, secs(365 * DAY));
        assert_eq!(f.key_overlap, secs(30 * DAY));
        assert_eq!(f.max_clock_skew, secs(60));
        assert_eq!(f.retry_initial, secs(2));
        assert_eq!(f.retry_max_interval, secs(3600));
        assert_eq!(f.retry_max_age, secs(DAY));
        assert_eq!(f.invite_ttl, secs(7 * DAY));
        assert!(f.resolve.is_empty());
        assert_eq!(c.audit.retention, secs(90 * DAY));
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.livekit, None);
        // No file and no variables is the same thing.
        assert_eq!(Config::load(None, Vec::new()).unwrap(), c);
        assert_eq!(load("", &[]).unwrap(), c);
    }

    #[test]
    fn example_toml_loads_and_is_the_default() {
        assert_eq!(load(EXAMPLE_TOML, &[]).unwrap(), Config::default_embedded());
    }

    /// The Debian package's /etc/scaiwave/scaiwave.toml is this example
    /// with the package's paths, so it documents every key too and cannot
    /// fall behind when a key is added. To update it, apply the two
    /// replacements below to EXAMPLE_TOML and keep the file's header.
    #[test]
    fn the_packaged_config_is_the_example_with_the_package_paths() {
        let packaged = include_str!("../packaging/scaiwave.toml");
        let body = packaged
            .split_once("\n\n")
            .map(|(_, body)| body)
            .expect("a header, a blank line, then the example");
        let expected = EXAMPLE_TOML
            .replacen(
                "data_dir = \"./scaiwave-data\"\n",
                "data_dir = \"/var/lib/scaiwave\"\n",
                1,
            )
            .replacen("listen = \"\"\n", "listen = \"127.0.0.1:9448\"\n", 1);
        assert_eq!(body, expected, "packaging/scaiwave.toml drifted");
        let c = load(packaged, &[]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/scaiwave"));
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9448".parse().unwrap()));
        // Loadable as installed: the rest is the embedded default.
        let default = Config::default_embedded();
        assert_eq!(c.server_name, default.server_name);
        assert_eq!(
            Config {
                data_dir: default.data_dir.clone(),
                metrics: default.metrics.clone(),
                ..c
            },
            default
        );
    }

    #[test]
    fn limits_refuse_what_cannot_work() {
        for (text, key) in [
            ("[limits]\nidle_timeout = \"0s\"", "limits.idle_timeout"),
            ("[limits]\nconnections_max = 0", "limits.connections_max"),
            (
                "[limits]\nconnections_max = 10\nconnections_per_ip_max = 11",
                "limits.connections_per_ip_max",
            ),
            (
                "[limits]\nrate_per_origin = \"300\"",
                "limits.rate_per_origin",
            ),
            (
                "[limits]\nrate_per_token = \"0/s\"",
                "limits.rate_per_token",
            ),
            (
                "[limits]\nrate_per_token = \"5/d\"",
                "limits.rate_per_token",
            ),
        ] {
            let e = load(text, &[]).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
        let e = load("", &[("SCAIWAVE_LIMITS__CONNECTIONS_MAX", "many")]).unwrap_err();
        assert!(
            e.message.contains("SCAIWAVE_LIMITS__CONNECTIONS_MAX"),
            "{e}"
        );
    }

    #[test]
    fn example_toml_names_every_key() {
        let documented = |name: &str| {
            EXAMPLE_TOML.lines().any(|line| {
                let line = line.strip_prefix("# ").unwrap_or(line);
                line.starts_with(&format!("{name} = ")) || line == format!("[{name}]")
            })
        };
        for (section, name, _) in KEYS {
            let name = if *name == "resolve" {
                "federation.resolve"
            } else {
                name
            };
            assert!(documented(name), "{section}.{name}");
        }
        for section in SECTIONS {
            assert!(documented(section), "[{section}]");
        }
    }

    #[test]
    fn full_example_loads() {
        let c = load(FULL, &[]).unwrap();
        assert_eq!(c.server_name.as_str(), "a.example.com");
        assert_eq!(c.listen, "0.0.0.0:8448".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/scaiwave"));
        assert_eq!(c.tls.cert, Some(PathBuf::from("/etc/scaiwave/cert.pem")));
        assert_eq!(c.tls.key, Some(PathBuf::from("/etc/scaiwave/key.pem")));
        assert_eq!(
            c.tls.trust_roots,
            vec![PathBuf::from("/etc/scaiwave/peer-ca.pem")]
        );
        let f = &c.federation;
        assert!(!f.enabled && !f.generate_key_on_start && f.allow_private_addresses);
        assert_eq!(f.key_rotation_interval, secs(180 * DAY));
        assert_eq!(f.key_overlap, Duration::ZERO);
        assert_eq!(f.max_clock_skew, secs(120));
        assert_eq!(f.retry_initial, secs(5));
        assert_eq!(f.retry_max_interval, secs(1800));
        assert_eq!(f.retry_max_age, secs(2 * DAY));
        assert_eq!(f.invite_ttl, secs(36 * 3600));
        let b = ServerName::parse("b.example.com").unwrap();
        let c8443 = ServerName::parse("c.test:8443").unwrap();
        assert_eq!(f.resolve[&b], "127.0.0.1:9449".parse().unwrap());
        assert_eq!(f.resolve[&c8443], "[::1]:8443".parse().unwrap());
        assert_eq!(f.resolve.len(), 2);
        assert_eq!(c.audit.retention, secs(30 * DAY));
        let l = &c.limits;
        assert_eq!(
            (
                l.request_head_timeout,
                l.idle_timeout,
                l.request_body_timeout
            ),
            (secs(5), secs(120), secs(20))
        );
        assert_eq!((l.connections_max, l.connections_per_ip_max), (1000, 50));
        assert_eq!(l.rate_per_origin.to_string(), "1000/m");
        assert_eq!(l.rate_per_token.to_string(), "5/s");
        assert_eq!(c.storage.cache_capacity, 16 * MIB);
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9448".parse().unwrap()));
        assert_eq!(c.log.format, LogFormat::Json);
        let lk = c.livekit.as_ref().unwrap();
        assert_eq!(lk.url, "wss://livekit.example.com");
        assert_eq!(lk.api_key, "APIkey");
        assert_eq!(lk.api_secret, "s3cret");
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug must not leak the secret"
        );
    }

    #[test]
    fn from_file_reads_and_names_read_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("scaiwave.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\n").unwrap();
        let c = Config::from_file(&file, Vec::new()).unwrap();
        assert_eq!(c.server_name.as_str(), "localhost:9000");

        let e = Config::from_file(&dir.path().join("missing.toml"), Vec::new()).unwrap_err();
        assert_eq!(e.key, "config");
        assert!(e.message.contains("missing.toml"), "{}", e.message);

        std::fs::write(&file, "listen = \n").unwrap();
        let e = Config::from_file(&file, Vec::new()).unwrap_err();
        assert_eq!(e.key, "config");
        assert!(e.message.contains("scaiwave.toml"), "{}", e.message);
    }

    #[test]
    fn env_server_name() {
        let c = load("", &[("SCAIWAVE_SERVER_NAME", "chat.example.com")]).unwrap();
        assert_eq!(c.server_name.as_str(), "chat.example.com");
    }

    #[test]
    fn env_data_dir() {
        let c = load("", &[("SCAIWAVE_DATA_DIR", "/srv/sw")]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/sw"));
    }

    #[test]
    fn env_listen() {
        let c = load("", &[("SCAIWAVE_LISTEN", "0.0.0.0:9443")]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9443".parse().unwrap());
    }

    #[test]
    fn env_key_overlap() {
        let c = load("", &[("SCAIWAVE_FEDERATION__KEY_OVERLAP", "7d")]).unwrap();
        assert_eq!(c.federation.key_overlap, secs(7 * DAY));
    }

    #[test]
    fn env_log_format() {
        let c = load("", &[("SCAIWAVE_LOG__FORMAT", "json")]).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn env_trust_roots_list() {
        let c = load("", &[("SCAIWAVE_TLS__TRUST_ROOTS", "/a.pem, /b.pem")]).unwrap();
        assert_eq!(
            c.tls.trust_roots,
            vec![PathBuf::from("/a.pem"), PathBuf::from("/b.pem")]
        );
        let c = load(
            "[tls]\ntrust_roots = [\"/x.pem\"]",
            &[("SCAIWAVE_TLS__TRUST_ROOTS", "")],
        )
        .unwrap();
        assert!(c.tls.trust_roots.is_empty());
        assert_eq!(
            err_key("", &[("SCAIWAVE_TLS__TRUST_ROOTS", "/a.pem,,/b.pem")]),
            "tls.trust_roots"
        );
    }

    #[test]
    fn env_booleans_and_other_sections() {
        let c = load(
            "",
            &[
                ("SCAIWAVE_FEDERATION__ENABLED", "false"),
                ("SCAIWAVE_FEDERATION__ALLOW_PRIVATE_ADDRESSES", "true"),
                ("SCAIWAVE_TLS__CERT", "/x"),
                ("SCAIWAVE_TLS__KEY", "/y"),
                ("SCAIWAVE_AUDIT__RETENTION", "1d"),
                ("SCAIWAVE_LIVEKIT__URL", "wss://lk.test"),
                ("SCAIWAVE_LIVEKIT__API_KEY", "k"),
                ("SCAIWAVE_LIVEKIT__API_SECRET", "s"),
            ],
        )
        .unwrap();
        assert!(!c.federation.enabled && c.federation.allow_private_addresses);
        assert_eq!(c.tls.cert, Some(PathBuf::from("/x")));
        assert_eq!(c.audit.retention, secs(DAY));
        assert_eq!(c.livekit.unwrap().api_secret, "s");
    }

    #[test]
    fn env_beats_file() {
        let file = "server_name = \"file.test\"\nlisten = \"127.0.0.1:1000\"\n[federation]\nkey_overlap = \"1d\"\n[log]\nformat = \"text\"";
        let c = load(
            file,
            &[
                ("SCAIWAVE_SERVER_NAME", "env.test"),
                ("SCAIWAVE_LISTEN", "127.0.0.1:2000"),
                ("SCAIWAVE_FEDERATION__KEY_OVERLAP", "2d"),
                ("SCAIWAVE_LOG__FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(c.server_name.as_str(), "env.test");
        assert_eq!(c.listen.port(), 2000);
        assert_eq!(c.federation.key_overlap, secs(2 * DAY));
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn default_server_name_follows_listen_port() {
        let c = load("listen = \"0.0.0.0:9000\"", &[]).unwrap();
        assert_eq!(c.server_name.as_str(), "localhost:9000");
        let c = load(
            "listen = \"0.0.0.0:9000\"",
            &[("SCAIWAVE_LISTEN", "127.0.0.1:7000")],
        )
        .unwrap();
        assert_eq!(c.server_name.as_str(), "localhost:7000");
        let c = load("", &[("SCAIWAVE_LISTEN", "[::]:443")]).unwrap();
        assert_eq!(c.server_name.as_str(), "localhost");
        assert_eq!(err_key("listen = \"127.0.0.1:0\"", &[]), "server_name");
        let c = load("listen = \"127.0.0.1:0\"\nserver_name = \"a.test\"", &[]).unwrap();
        assert_eq!(c.listen.port(), 0);
    }

    #[test]
    fn ignored_variables() {
        let c = load(
            "",
            &[
                ("SCAIWAVE_CONFIG", "/etc/scaiwave.toml"),
                ("SCAIWAVE_LOG", "debug"),
                ("PATH", "/bin"),
                ("scaiwave_listen", "nonsense"),
            ],
        )
        .unwrap();
        assert_eq!(c, Config::default_embedded());
    }

    #[test]
    fn unknown_top_level_key() {
        let e = load("sever_name = \"a.test\"", &[]).unwrap_err();
        assert_eq!(e.key, "sever_name");
        assert!(
            e.message.contains("did you mean `server_name`?"),
            "{}",
            e.message
        );
        assert_eq!(err_key("[stats]\nport = 1", &[]), "stats");
        let e = load("bogus = 1", &[]).unwrap_err();
        assert!(!e.message.contains("did you mean"), "{}", e.message);
    }

    #[test]
    fn unknown_nested_key() {
        let e = load("[federation]\nretry_intial = \"1s\"", &[]).unwrap_err();
        assert_eq!(e.key, "federation.retry_intial");
        assert!(
            e.message.contains("`federation.retry_initial`"),
            "{}",
            e.message
        );
        assert_eq!(
            err_key(
                "[livekit]\nurl = \"wss://x\"\napi_key = \"k\"\napi_secret = \"s\"\nroom = 1",
                &[]
            ),
            "livekit.room"
        );
        assert_eq!(
            err_key("[federation.resolve.deeper]\nx = 1", &[]),
            "federation.resolve.deeper"
        );
    }

    #[test]
    fn unknown_env_var() {
        let e = load("", &[("SCAIWAVE_FEDERATION__KEY_OVERLAPP", "1d")]).unwrap_err();
        assert_eq!(e.key, "SCAIWAVE_FEDERATION__KEY_OVERLAP".to_string() + "P");
        assert!(
            e.message.contains("SCAIWAVE_FEDERATION__KEY_OVERLAP?"),
            "{}",
            e.message
        );
        assert_eq!(
            err_key("", &[("SCAIWAVE_TOTALLY_UNRELATED", "x")]),
            "SCAIWAVE_TOTALLY_UNRELATED"
        );
        assert_eq!(
            err_key("", &[("SCAIWAVE_federation__enabled", "true")]),
            "SCAIWAVE_federation__enabled"
        );
    }

    #[test]
    fn resolve_from_env_is_refused() {
        for var in [
            "SCAIWAVE_FEDERATION__RESOLVE",
            "SCAIWAVE_FEDERATION__RESOLVE__B_TEST",
        ] {
            let e = load("", &[(var, "127.0.0.1:1")]).unwrap_err();
            assert_eq!(e.key, var);
            assert!(e.message.contains("config file"), "{}", e.message);
        }
    }

    #[test]
    fn bad_duration() {
        let e = load("[federation]\nmax_clock_skew = \"sixty\"", &[]).unwrap_err();
        assert_eq!(e.key, "federation.max_clock_skew");
        assert!(
            e.message
                .starts_with("expected a duration like 60s, 24h, 365d"),
            "{}",
            e.message
        );
        assert_eq!(
            err_key("[federation]\nmax_clock_skew = 60", &[]),
            "federation.max_clock_skew"
        );
        assert_eq!(
            err_key("[audit]\nretention = \"1000000y\"", &[]),
            "audit.retention"
        );
        let e = load("", &[("SCAIWAVE_FEDERATION__INVITE_TTL", "soon")]).unwrap_err();
        assert_eq!(e.key, "federation.invite_ttl");
        assert!(
            e.message.contains("SCAIWAVE_FEDERATION__INVITE_TTL"),
            "{}",
            e.message
        );
    }

    #[test]
    fn bad_bool() {
        assert_eq!(
            err_key("[federation]\nenabled = \"yes\"", &[]),
            "federation.enabled"
        );
        let e = load("", &[("SCAIWAVE_FEDERATION__GENERATE_KEY_ON_START", "yes")]).unwrap_err();
        assert_eq!(e.key, "federation.generate_key_on_start");
        assert!(
            e.message.contains("expected true or false"),
            "{}",
            e.message
        );
    }

    #[test]
    fn bad_server_name() {
        let e = load("server_name = \"Chat.Example.com\"", &[]).unwrap_err();
        assert_eq!(e.key, "server_name");
        assert!(e.message.contains("lower-case"), "{}", e.message);
        assert_eq!(
            err_key("", &[("SCAIWAVE_SERVER_NAME", "a.test:443")]),
            "server_name"
        );
    }

    #[test]
    fn bad_scalars() {
        assert_eq!(err_key("listen = \"localhost:8448\"", &[]), "listen");
        assert_eq!(err_key("data_dir = \"\"", &[]), "data_dir");
        assert_eq!(err_key("[log]\nformat = \"xml\"", &[]), "log.format");
        assert_eq!(err_key("tls = \"on\"", &[]), "tls");
        assert_eq!(
            err_key("[tls]\ntrust_roots = \"/a.pem\"", &[]),
            "tls.trust_roots"
        );
        assert_eq!(
            err_key("[federation]\nresolve = 1", &[]),
            "federation.resolve"
        );
    }

    #[test]
    fn bad_resolve_address() {
        let e = load(
            "[federation.resolve]\n\"b.example.com\" = \"b.example.com:9449\"",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "federation.resolve.\"b.example.com\"");
        assert!(e.message.contains("socket address"), "{}", e.message);
    }

    #[test]
    fn resolve_key_not_a_server_name() {
        let e = load(
            "[federation.resolve]\n\"B.example.com\" = \"127.0.0.1:1\"",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "federation.resolve.\"B.example.com\"");
        assert_eq!(
            err_key(
                "[federation.resolve]\n\"10.0.0.1\" = \"10.0.0.1:8448\"",
                &[]
            ),
            "federation.resolve.\"10.0.0.1\""
        );
    }

    #[test]
    fn livekit_missing_api_secret() {
        let e = load("[livekit]\nurl = \"wss://lk.test\"\napi_key = \"k\"", &[]).unwrap_err();
        assert_eq!(e.key, "livekit.api_secret");
        assert!(e.message.contains("all"), "{}", e.message);
        assert_eq!(
            err_key(
                "[livekit]\nurl = \"lk.test\"\napi_key = \"k\"\napi_secret = \"s\"",
                &[]
            ),
            "livekit.url"
        );
        let e = load(
            "[livekit]\nurl = \"wss://lk.test\"\napi_key = \"k\"\napi_secret = \"\"",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "livekit.api_secret");
        // The env can complete a file section, keeping the secret out of it.
        let c = load(
            "[livekit]\nurl = \"wss://lk.test\"\napi_key = \"k\"",
            &[("SCAIWAVE_LIVEKIT__API_SECRET", "s")],
        )
        .unwrap();
        assert!(c.livekit.is_some());
    }

    #[test]
    fn cert_without_key() {
        assert_eq!(err_key("[tls]\ncert = \"/c.pem\"", &[]), "tls.key");
        assert_eq!(err_key("", &[("SCAIWAVE_TLS__KEY", "/k.pem")]), "tls.cert");
    }

    #[test]
    fn retry_initial_above_max_interval() {
        let e = load(
            "[federation]\nretry_initial = \"2h\"\nretry_max_interval = \"1h\"",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "federation.retry_initial");
        assert!(
            e.message.contains("2h") && e.message.contains("1h"),
            "{}",
            e.message
        );
        // Equal is fine: a constant interval.
        load(
            "[federation]\nretry_initial = \"1h\"\nretry_max_interval = \"1h\"",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn zero_durations() {
        for name in [
            "key_rotation_interval",
            "max_clock_skew",
            "retry_initial",
            "retry_max_interval",
            "retry_max_age",
            "invite_ttl",
        ] {
            assert_eq!(
                err_key(&format!("[federation]\n{name} = \"0s\""), &[]),
                format!("federation.{name}")
            );
        }
        assert_eq!(
            err_key("[audit]\nretention = \"0s\"", &[]),
            "audit.retention"
        );
        let c = load("[federation]\nkey_overlap = \"0s\"", &[]).unwrap();
        assert_eq!(c.federation.key_overlap, Duration::ZERO);
    }

    #[test]
    fn not_toml() {
        assert_eq!(err_key("listen = ", &[]), "config");
    }

    #[test]
    fn display_names_the_key() {
        let e = ConfigError::new(
            "federation.max_clock_skew",
            "expected a duration like 60s, 24h, 365d",
        );
        assert_eq!(
            e.to_string(),
            "configuration error in `federation.max_clock_skew`: expected a duration like 60s, 24h, 365d"
        );
    }

    #[test]
    fn humantime_string_is_exact_and_reparses() {
        for (d, s) in [
            (secs(365 * DAY), "365d"),
            (secs(3600 + 1800), "1h 30m"),
            (secs(60), "1m"),
            (Duration::ZERO, "0s"),
            (Duration::from_millis(1500), "1s 500ms"),
            (Duration::new(DAY + 1, 2_003), "1d 1s 2us 3ns"),
        ] {
            assert_eq!(humantime_string(d), s);
            assert_eq!(humantime::parse_duration(s).unwrap(), d);
        }
    }

    #[test]
    fn every_key_but_resolve_settable_from_env() {
        // The variables spelling FULL; this also holds KEYS and the walk
        // together, since each key must both map and be read.
        let vars = [
            ("SCAIWAVE_SERVER_NAME", "a.example.com"),
            ("SCAIWAVE_LISTEN", "0.0.0.0:8448"),
            ("SCAIWAVE_DATA_DIR", "/var/lib/scaiwave"),
            ("SCAIWAVE_TLS__CERT", "/etc/scaiwave/cert.pem"),
            ("SCAIWAVE_TLS__KEY", "/etc/scaiwave/key.pem"),
            ("SCAIWAVE_TLS__TRUST_ROOTS", "/etc/scaiwave/peer-ca.pem"),
            ("SCAIWAVE_FEDERATION__ENABLED", "false"),
            ("SCAIWAVE_FEDERATION__GENERATE_KEY_ON_START", "false"),
            ("SCAIWAVE_FEDERATION__KEY_ROTATION_INTERVAL", "180d"),
            ("SCAIWAVE_FEDERATION__KEY_OVERLAP", "0s"),
            ("SCAIWAVE_FEDERATION__MAX_CLOCK_SKEW", "2m"),
            ("SCAIWAVE_FEDERATION__RETRY_INITIAL", "5s"),
            ("SCAIWAVE_FEDERATION__RETRY_MAX_INTERVAL", "30m"),
            ("SCAIWAVE_FEDERATION__RETRY_MAX_AGE", "48h"),
            ("SCAIWAVE_FEDERATION__INVITE_TTL", "1d 12h"),
            ("SCAIWAVE_FEDERATION__ALLOW_PRIVATE_ADDRESSES", "true"),
            ("SCAIWAVE_AUDIT__RETENTION", "30d"),
            ("SCAIWAVE_LIMITS__REQUEST_HEAD_TIMEOUT", "5s"),
            ("SCAIWAVE_LIMITS__IDLE_TIMEOUT", "2m"),
            ("SCAIWAVE_LIMITS__REQUEST_BODY_TIMEOUT", "20s"),
            ("SCAIWAVE_LIMITS__CONNECTIONS_MAX", "1000"),
            ("SCAIWAVE_LIMITS__CONNECTIONS_PER_IP_MAX", "50"),
            ("SCAIWAVE_LIMITS__RATE_PER_ORIGIN", "1000/m"),
            ("SCAIWAVE_LIMITS__RATE_PER_TOKEN", "5/s"),
            ("SCAIWAVE_STORAGE__CACHE_CAPACITY", "16MiB"),
            ("SCAIWAVE_STORAGE__SYNC", "flush"),
            ("SCAIWAVE_METRICS__LISTEN", "127.0.0.1:9448"),
            ("SCAIWAVE_LOG__FORMAT", "json"),
            ("SCAIWAVE_LIVEKIT__URL", "wss://livekit.example.com"),
            ("SCAIWAVE_LIVEKIT__API_KEY", "APIkey"),
            ("SCAIWAVE_LIVEKIT__API_SECRET", "s3cret"),
        ];
        let settable = KEYS
            .iter()
            .filter(|(_, _, f)| *f != EnvForm::FileOnly)
            .count();
        assert_eq!(vars.len(), settable);
        let mut expected = load(FULL, &[]).unwrap();
        expected.federation.resolve.clear();
        assert_eq!(load("", &vars).unwrap(), expected);
    }
}
