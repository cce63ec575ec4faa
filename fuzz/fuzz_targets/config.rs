//! `Config::load` on arbitrary TOML text and `SCAIWAVE_*` variables: an
//! operator's typo must come back as a `ConfigError`, never a panic.
//!
//! Input layout: the bytes up to the first 0x00 are the TOML text (lossy
//! UTF-8); after it, each further 0x00-separated field is one variable: its
//! first byte picks the name from `NAMES` (the `KEYS` table of
//! `src/config.rs`, which is private, plus the names `apply_env` treats
//! specially), the rest is the value (lossy UTF-8).
#![no_main]

use libfuzzer_sys::fuzz_target;
use scaiwave::config::{humantime_string, Config};

const NAMES: &[&str] = &[
    "SCAIWAVE_SERVER_NAME",
    "SCAIWAVE_LISTEN",
    "SCAIWAVE_DATA_DIR",
    "SCAIWAVE_TLS__CERT",
    "SCAIWAVE_TLS__KEY",
    "SCAIWAVE_TLS__TRUST_ROOTS",
    "SCAIWAVE_FEDERATION__ENABLED",
    "SCAIWAVE_FEDERATION__GENERATE_KEY_ON_START",
    "SCAIWAVE_FEDERATION__KEY_ROTATION_INTERVAL",
    "SCAIWAVE_FEDERATION__KEY_OVERLAP",
    "SCAIWAVE_FEDERATION__MAX_CLOCK_SKEW",
    "SCAIWAVE_FEDERATION__RETRY_INITIAL",
    "SCAIWAVE_FEDERATION__RETRY_MAX_INTERVAL",
    "SCAIWAVE_FEDERATION__RETRY_MAX_AGE",
    "SCAIWAVE_FEDERATION__INVITE_TTL",
    "SCAIWAVE_FEDERATION__ALLOW_PRIVATE_ADDRESSES",
    "SCAIWAVE_FEDERATION__RESOLVE",
    "SCAIWAVE_AUDIT__RETENTION",
    "SCAIWAVE_LOG__FORMAT",
    "SCAIWAVE_LIVEKIT__URL",
    "SCAIWAVE_LIVEKIT__API_KEY",
    "SCAIWAVE_LIVEKIT__API_SECRET",
    // Special to apply_env: ignored, refused as file-only, unknown, outside.
    "SCAIWAVE_CONFIG",
    "SCAIWAVE_LOG",
    "SCAIWAVE_FEDERATION__RESOLVE__B_EXAMPLE_COM",
    "SCAIWAVE_FEDERATION__RETRY_INTIAL",
    "SCAIWAVE_",
    "HOME",
];

fuzz_target!(|data: &[u8]| {
    let mut fields = data.split(|&b| b == 0);
    let toml = String::from_utf8_lossy(fields.next().unwrap_or_default());
    let env: Vec<(String, String)> = fields
        .take(8)
        .filter_map(|f| {
            let (&pick, value) = f.split_first()?;
            let name = NAMES[usize::from(pick) % NAMES.len()].to_string();
            Some((name, String::from_utf8_lossy(value).into_owned()))
        })
        .collect();
    // The file alone, and the file under the variables.
    let _ = Config::load(Some(&toml), Vec::new());
    if let Ok(config) = Config::load(Some(&toml), env) {
        // What loads is internally consistent.
        let f = &config.federation;
        assert!(f.retry_initial <= f.retry_max_interval, "{config:?}");
        assert!(!config.audit.retention.is_zero());
        let durations = [
            f.key_rotation_interval,
            f.key_overlap,
            f.max_clock_skew,
            f.retry_initial,
            f.retry_max_interval,
            f.retry_max_age,
            f.invite_ttl,
            config.audit.retention,
        ];
        for d in durations {
            // Bounded so that deadlines computed from it cannot overflow.
            assert!(std::time::SystemTime::now().checked_add(d).is_some());
            assert!(std::time::Instant::now().checked_add(d).is_some());
            // humantime_string promises to read back to the same value.
            let s = humantime_string(d);
            assert_eq!(humantime::parse_duration(&s).ok(), Some(d), "{s:?}");
        }
    }
});
