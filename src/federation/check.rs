//! `scaiwave admin federation check <server_name>` (SPEC §13): the
//! handshake troubleshooting guide as a program. Each finding names its
//! `SW_FED_*` code and the fix.

use std::fmt;
use std::time::Duration;

use crate::error::Code;
use crate::ids::ServerName;
use crate::limits::{DISK_LOW_SPACE_BYTES, DISK_LOW_SPACE_PERCENT, SYNC_S2S_TIMEOUT_SECS};
use crate::storage::FreeSpace;

use crate::protocol::wire::Descriptor;

use super::Federation;

/// One step of the check. A warning is `ok` (it fails nothing yet) but
/// carries the code it is heading for and the fix.
pub struct Finding {
    pub step: &'static str,
    pub ok: bool,
    pub code: Option<Code>,
    pub detail: String,
    pub fix: Option<String>,
}

impl Finding {
    fn ok(step: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            step,
            ok: true,
            code: None,
            detail: detail.into(),
            fix: None,
        }
    }

    /// A finding that does not fail the check, but names a code and a fix.
    fn warn(
        step: &'static str,
        code: Code,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            ok: true,
            ..Finding::fail(step, code, detail, fix)
        }
    }

    fn fail(
        step: &'static str,
        code: Code,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            step,
            ok: false,
            code: Some(code),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ok && self.code.is_none() {
            write!(f, "OK    {:<18} {}", self.step, self.detail)
        } else {
            let code = self.code.map(|c| c.as_str()).unwrap_or("-");
            let level = if self.ok { "WARN" } else { "FAIL" };
            write!(f, "{level:<5} {:<18} {code}: {}", self.step, self.detail)?;
            if let Some(fix) = &self.fix {
                write!(f, "\n      fix: {fix}")?;
            }
            Ok(())
        }
    }
}

/// A local id nobody has: the probe only wants to learn whether the peer
/// lets our signed request through.
const PROBE_LOCAL_ID: &str = "scaiwave-federation-check";

pub async fn check(fed: &Federation, peer: &ServerName) -> Vec<Finding> {
    let ours = fed.keys.descriptor(&fed.server_name);
    let store = &fed.store;
    let mut out = vec![
        own_descriptor(fed, &ours),
        data_disk(store.data_dir(), store.free_space(), store.is_full()),
    ];
    let date_secs = peer_descriptor(fed, peer, &ours, &mut out).await;
    if let Some(theirs) = date_secs {
        out.push(clock_skew(fed, peer, theirs));
    }
    // 5. Our policy towards them.
    if let Err(e) = fed.policy().admit(peer) {
        out.push(Finding::fail(
            "our policy",
            e.code,
            e.message,
            "PUT /v1/admin/federation/policy",
        ));
        // We never send to a server we refuse, so no probe either.
        out.push(Finding::fail(
            "their policy",
            e.code,
            format!("not probed: our policy refuses {peer}"),
            "fix our policy first",
        ));
        out.push(last_delivery(fed, peer));
        return out;
    }
    out.push(Finding::ok(
        "our policy",
        format!("we federate with {peer}"),
    ));
    out.push(their_policy(fed, peer).await);
    out.push(last_delivery(fed, peer));
    out
}

/// Step 1: our own descriptor.
fn own_descriptor(fed: &Federation, ours: &Descriptor) -> Finding {
    if ours.public_key.is_empty() {
        Finding::fail(
            "own descriptor",
            Code::NoKey,
            "this server has no signing key (public_key is empty)",
            "scaiwave admin federation key generate",
        )
    } else {
        Finding::ok(
            "own descriptor",
            format!("{} publishes key {}", fed.server_name, ours.key_id),
        )
    }
}

/// Our data disk: a full one refuses every event peers send us (507
/// `SW_STORAGE_FULL`), so a disk running low is said before it happens.
/// `refusing`: a write was already refused (sled then takes none until a
/// restart).
fn data_disk(
    data_dir: &std::path::Path,
    free: std::io::Result<FreeSpace>,
    refusing: bool,
) -> Finding {
    const STEP: &str = "data disk";
    let dir = data_dir.display();
    let mib = |bytes: u64| bytes / (1024 * 1024);
    if refusing {
        return Finding::fail(
            STEP,
            Code::StorageFull,
            "the data disk filled up: writes are refused until scaiwave restarts",
            format!("free space in {dir}, then restart scaiwave"),
        );
    }
    match free {
        Ok(f) if f.is_low() => Finding::warn(
            STEP,
            Code::StorageFull,
            format!(
                "{} MiB of {} MiB free in {dir} (below {DISK_LOW_SPACE_PERCENT} % or {} MiB)",
                mib(f.available_bytes),
                mib(f.total_bytes),
                mib(DISK_LOW_SPACE_BYTES)
            ),
            format!("free space in {dir} before it fills; then writes are refused"),
        ),
        Ok(f) => Finding::ok(
            STEP,
            format!(
                "{} MiB of {} MiB free in {dir}",
                mib(f.available_bytes),
                mib(f.total_bytes)
            ),
        ),
        Err(e) => Finding::warn(
            STEP,
            Code::Internal,
            format!("cannot read the free space of {dir}: {e}"),
            "check that the data dir exists and is readable",
        ),
    }
}

/// Steps 2 and 3: the peer's descriptor over a verified TLS chain, and the
/// protocol versions we share. Answers the peer's `Date`, as Unix seconds.
async fn peer_descriptor(
    fed: &Federation,
    peer: &ServerName,
    ours: &Descriptor,
    out: &mut Vec<Finding>,
) -> Option<i64> {
    let (d, date_secs) = match fed.outbound.descriptor(peer, true).await {
        Ok((d, _, date)) => (d, date),
        Err(why) => {
            out.push(Finding::fail(
                "peer descriptor",
                Code::SignatureMismatch,
                format!("https://{peer}/.well-known/scaiwave/server: {why}"),
                "make it load over HTTPS with a certificate chain our system roots or tls.trust_roots accept",
            ));
            return None;
        }
    };
    match fed.verifier.refresh(peer).await {
        Ok(()) => out.push(Finding::ok(
            "peer descriptor",
            format!(
                "{peer} publishes key {} ({} old keys)",
                d.key_id,
                d.old_keys.len()
            ),
        )),
        Err(e) => out.push(Finding::fail(
            "peer descriptor",
            e.code,
            e.message,
            "the peer's admin fixes its descriptor (server_name, key ids) or generates a key",
        )),
    }
    let common: Vec<&String> = d
        .protocol_versions
        .iter()
        .filter(|v| ours.protocol_versions.contains(v))
        .collect();
    out.push(if common.is_empty() {
        Finding::fail(
            "protocol versions",
            Code::ProtocolVersion,
            format!(
                "{peer} speaks {:?}, we speak {:?}",
                d.protocol_versions, ours.protocol_versions
            ),
            "upgrade one side so both share a version",
        )
    } else {
        Finding::ok("protocol versions", format!("shared: {common:?}"))
    });
    date_secs
}

/// Step 4: clock skew, from the peer's Date header.
fn clock_skew(fed: &Federation, peer: &ServerName, theirs: i64) -> Finding {
    let skew = theirs - fed.clock.now_secs();
    let max = fed.config.max_clock_skew.as_secs() as i64;
    if skew.abs() > max {
        Finding::fail(
            "clock skew",
            Code::SignatureMismatch,
            format!("{peer}'s clock is {skew:+} s from ours (allowed ±{max} s)"),
            "sync NTP on both servers",
        )
    } else {
        Finding::ok("clock skew", format!("{skew:+} s"))
    }
}

/// Step 6, their policy towards us: a signed probe for a participant
/// nobody has, which a peer that lets us in answers "not found".
async fn their_policy(fed: &Federation, peer: &ServerName) -> Finding {
    let path = super::peer_api::profile_path(PROBE_LOCAL_ID);
    let timeout = Duration::from_secs(SYNC_S2S_TIMEOUT_SECS);
    let reply = match fed.s2s(http::Method::GET, peer, &path, None, timeout).await {
        Err(e) => {
            return Finding::fail(
                "their policy",
                e.code,
                e.message,
                "generate our signing key first",
            )
        }
        Ok(Err(e)) => {
            return Finding::fail(
                "their policy",
                Code::PeerUnknown,
                format!("no answer: {e}"),
                "check that the peer is up and reachable",
            )
        }
        Ok(Ok(reply)) => reply,
    };
    let err = reply.error();
    match err.as_ref().and_then(|e| Code::parse(&e.code)) {
        Some(Code::ParticipantNotFound) => Finding::ok(
            "their policy",
            format!("{peer} accepts our signed requests"),
        ),
        Some(code) => Finding::fail(
            "their policy",
            code,
            err.map(|e| e.message).unwrap_or_default(),
            match code {
                Code::PeerUnknown | Code::PolicyRejected => format!(
                    "{peer}'s admin adds {} to allowed_peers (or opens its policy)",
                    fed.server_name
                ),
                Code::SignatureMismatch => "the peer cannot verify us: check our descriptor, clocks, and its trust in our certificate".to_string(),
                _ => "see docs/errors.md for this code".to_string(),
            },
        ),
        None => Finding::fail(
            "their policy",
            Code::PeerUnknown,
            format!("unexpected answer HTTP {}", reply.status),
            "the peer may not run ScaiWave federation at this name",
        ),
    }
}

/// Step 7: what delivery last saw.
fn last_delivery(fed: &Federation, peer: &ServerName) -> Finding {
    match fed.store.peer_record(peer) {
        Ok(rec) => match rec.last_error {
            Some(e) => Finding::fail(
                "last delivery",
                Code::parse(&e.code).unwrap_or(Code::Internal),
                format!("{} at {}", e.message, crate::clock::rfc3339(e.at_ms)),
                "fix the finding above; queued events are retried",
            ),
            None => Finding::ok(
                "last delivery",
                rec.last_seen_ms
                    .map(|t| format!("last seen {}", crate::clock::rfc3339(t)))
                    .unwrap_or_else(|| "no traffic yet".into()),
            ),
        },
        Err(e) => Finding::fail("last delivery", e.code, e.message, "see the server log"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn the_data_disk_is_ok_then_warned_then_failed() {
        let dir = std::path::Path::new("/var/lib/scaiwave");
        let free = |available_mib: u64, total_mib: u64| {
            Ok(FreeSpace {
                available_bytes: available_mib * MIB,
                total_bytes: total_mib * MIB,
            })
        };
        let ok = data_disk(dir, free(40_000, 100_000), false);
        assert!(ok.ok && ok.code.is_none(), "{ok}");
        assert_eq!(
            ok.to_string(),
            "OK    data disk          40000 MiB of 100000 MiB free in /var/lib/scaiwave"
        );

        let low = data_disk(dir, free(400, 100_000), false);
        assert!(low.ok, "a warning fails nothing yet: {low}");
        let text = low.to_string();
        assert!(
            text.starts_with("WARN  data disk          SW_STORAGE_FULL: 400 MiB of 100000 MiB free in /var/lib/scaiwave"),
            "{text}"
        );
        assert!(
            text.contains("fix: free space in /var/lib/scaiwave before it fills"),
            "{text}"
        );

        let full = data_disk(dir, free(900, 100_000), true);
        assert!(!full.ok && full.code == Some(Code::StorageFull), "{full}");
        assert!(
            full.to_string()
                .contains("fix: free space in /var/lib/scaiwave, then restart scaiwave"),
            "{full}"
        );

        let unknown = data_disk(
            dir,
            Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
            false,
        );
        assert!(
            unknown.ok && unknown.to_string().starts_with("WARN"),
            "{unknown}"
        );
    }
}
