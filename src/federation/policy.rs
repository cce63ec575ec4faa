//! Federation policy (SPEC §7): whom this server talks to, both ways.
//!
//! One function, [`Policy::admit`], decides for inbound requests, relayed
//! events and outbound sends alike, so we never send to a server we would
//! refuse.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Code, Error, Result};
use crate::ids::ServerName;
use crate::limits::BACKFILL_EVENTS_MAX;
use crate::limits::{FOREIGN_PARTICIPANTS_MAX, PEER_LIST_MAX};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Open,
    InviteOnly,
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub default_mode: Mode,
    pub allowed_peers: Vec<ServerName>,
    pub denied_peers: Vec<ServerName>,
    pub max_foreign_participants_per_room: u64,
    pub max_backfill_events_per_request: u64,
    pub min_signature_protocol: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default_mode: Mode::Open,
            allowed_peers: Vec::new(),
            denied_peers: Vec::new(),
            max_foreign_participants_per_room: 50,
            max_backfill_events_per_request: 1000,
            min_signature_protocol: "v1".into(),
        }
    }
}

impl Policy {
    /// Does this policy let us exchange traffic with `peer`?
    pub fn admit(&self, peer: &ServerName) -> Result<()> {
        if self.denied_peers.contains(peer) {
            return Err(Error::new(
                Code::PolicyRejected,
                format!("{peer} is in denied_peers; remove it with PUT /v1/admin/federation/policy to federate with it"),
            ));
        }
        match self.default_mode {
            Mode::Open => Ok(()),
            Mode::InviteOnly if self.allowed_peers.contains(peer) => Ok(()),
            Mode::InviteOnly => Err(Error::new(
                Code::PeerUnknown,
                format!("{peer} is not in allowed_peers and the policy is invite_only; add it with PUT /v1/admin/federation/policy {{\"allowed_peers\": [\"{peer}\"]}}"),
            )),
            Mode::Closed => Err(Error::new(
                Code::PolicyRejected,
                "federation policy is closed; set default_mode to open or invite_only to federate",
            )),
        }
    }

    /// Apply a partial update (`PUT`): fields given replace theirs. Unknown
    /// fields or bad values fail naming the field, and leave `self` as is.
    pub fn patched(&self, patch: &Value) -> Result<Policy> {
        let obj = patch
            .as_object()
            .ok_or_else(|| Error::bad_request("the policy update must be a JSON object"))?;
        let mut next = self.clone();
        for (field, value) in obj {
            let bad = |what: &str| Error::bad_request(format!("policy field `{field}`: {what}"));
            match field.as_str() {
                "default_mode" => {
                    next.default_mode = serde_json::from_value(value.clone())
                        .map_err(|_| bad("expected \"open\", \"invite_only\" or \"closed\""))?;
                }
                "allowed_peers" | "denied_peers" => {
                    let list = value.as_array().ok_or_else(|| bad("expected a list of server names"))?;
                    if list.len() > PEER_LIST_MAX {
                        return Err(bad(&format!("at most {PEER_LIST_MAX} entries")));
                    }
                    let mut names = Vec::with_capacity(list.len());
                    for item in list {
                        let s = item.as_str().ok_or_else(|| bad("expected a list of server names"))?;
                        let name = ServerName::parse(s).map_err(|e| bad(&e.message))?;
                        if !names.contains(&name) {
                            names.push(name);
                        }
                    }
                    if field == "allowed_peers" {
                        next.allowed_peers = names;
                    } else {
                        next.denied_peers = names;
                    }
                }
                "max_foreign_participants_per_room" => {
                    next.max_foreign_participants_per_room = value
                        .as_u64()
                        .filter(|n| *n <= FOREIGN_PARTICIPANTS_MAX)
                        .ok_or_else(|| bad(&format!("expected an integer 0-{FOREIGN_PARTICIPANTS_MAX}")))?;
                }
                "max_backfill_events_per_request" => {
                    next.max_backfill_events_per_request = value
                        .as_u64()
                        .filter(|n| *n <= BACKFILL_EVENTS_MAX)
                        .ok_or_else(|| bad(&format!("expected an integer 0-{BACKFILL_EVENTS_MAX} (0 refuses backfill)")))?;
                }
                "min_signature_protocol" => {
                    let v = value.as_str().filter(|v| *v == "v1").ok_or_else(|| bad("expected \"v1\", the only protocol version"))?;
                    next.min_signature_protocol = v.to_string();
                }
                _ => {
                    return Err(Error::bad_request(format!(
                        "unknown policy field `{field}`; known fields: default_mode, allowed_peers, denied_peers, max_foreign_participants_per_room, max_backfill_events_per_request, min_signature_protocol"
                    )))
                }
            }
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn name(s: &str) -> ServerName {
        ServerName::parse(s).unwrap()
    }

    #[test]
    fn modes() {
        let mut p = Policy::default();
        assert!(p.admit(&name("x.test")).is_ok());
        p.default_mode = Mode::InviteOnly;
        assert_eq!(
            p.admit(&name("x.test")).unwrap_err().code,
            Code::PeerUnknown
        );
        p.allowed_peers.push(name("x.test"));
        assert!(p.admit(&name("x.test")).is_ok());
        p.denied_peers.push(name("x.test"));
        assert_eq!(
            p.admit(&name("x.test")).unwrap_err().code,
            Code::PolicyRejected
        );
        p.default_mode = Mode::Closed;
        assert_eq!(
            p.admit(&name("y.test")).unwrap_err().code,
            Code::PolicyRejected
        );
    }

    #[test]
    fn partial_update_and_refusals_name_the_field() {
        let p = Policy::default();
        let q = p.patched(&json!({"allowed_peers": ["b.test"]})).unwrap();
        assert_eq!(q.allowed_peers, vec![name("b.test")]);
        assert_eq!(q.default_mode, Mode::Open);
        for (patch, field) in [
            (json!({"default_mode": "sometimes"}), "default_mode"),
            (json!({"allowed_peers": ["B.test"]}), "allowed_peers"),
            (
                json!({"max_backfill_events_per_request": 5000}),
                "max_backfill_events_per_request",
            ),
            (
                json!({"max_foreign_participants_per_room": -1}),
                "max_foreign_participants_per_room",
            ),
            (json!({"colour": "blue"}), "colour"),
        ] {
            let e = p.patched(&patch).unwrap_err();
            assert_eq!(e.code, Code::BadRequest);
            assert!(e.message.contains(field), "{}", e.message);
        }
    }
}
