//! Validated identifiers of SPEC §2: once you hold one, it is valid.
//!
//! Each newtype is built only by `parse` (or a generator), so nothing
//! downstream re-validates. All of them serialise as their string form.

use std::fmt;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::limits::{LOCAL_ID_BYTES_MAX, SERVER_NAME_BYTES_MAX};

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).map_err(|e| serde::de::Error::custom(e.message))
            }
        }
        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                $name::parse(s)
            }
        }
    };
}

/// `@local:server` / `!opaque:server` split at the FIRST ':' (SPEC §2).
fn sigil_parts(s: &str, sigil: char) -> Option<(&str, &str)> {
    s.strip_prefix(sigil)?.split_once(':')
}

/// A server's DNS name with optional port, e.g. `a.example.com` or `localhost:8448`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(String);
string_newtype!(ServerName);

impl ServerName {
    pub fn parse(s: &str) -> Result<ServerName> {
        let bad = |why: &str| {
            Error::bad_request(format!(
                "invalid server_name {s:?}: {why}; use a lower-case DNS name with an optional :port, e.g. chat.example.com"
            ))
        };
        if s.is_empty() || s.len() > SERVER_NAME_BYTES_MAX {
            return Err(bad("must be 1-255 bytes"));
        }
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !host.split('.').all(label_ok) {
            return Err(bad(
                "the host must be lower-case labels of [a-z0-9-] separated by dots",
            ));
        }
        // URL parsers (and inet_aton) read a host whose last label is all
        // digits, or starts with 0x, as an IPv4 address: `2130706433`,
        // `127.1`, `0x7f000001` and `017700000001` all dial 127.0.0.1. No
        // DNS name ends that way, so such names are refused (SPEC §2).
        let last = host.rsplit('.').next().unwrap_or(host);
        if last.bytes().all(|b| b.is_ascii_digit()) || last.starts_with("0x") {
            return Err(bad(
                "IP literals (and names whose last label is a number) are not server names",
            ));
        }
        if let Some(port) = port {
            let digits_ok = !port.is_empty()
                && port.len() <= 5
                && !port.starts_with('0')
                && port.bytes().all(|b| b.is_ascii_digit());
            if !digits_ok || port.parse::<u16>().is_err() {
                return Err(bad("the port must be 1-65535"));
            }
            if port == "443" {
                return Err(bad("leave out :443, it is the default"));
            }
        }
        Ok(ServerName(s.to_string()))
    }

    /// The host part (what TLS SNI carries).
    pub fn host(&self) -> &str {
        self.0.split(':').next().unwrap_or(&self.0)
    }

    /// The explicit port, if any (443 otherwise).
    pub fn port(&self) -> Option<u16> {
        self.0.split_once(':').and_then(|(_, p)| p.parse().ok())
    }
}

/// The local part of an FQID: 1-64 chars of `[a-z0-9._=-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalId(String);
string_newtype!(LocalId);

impl LocalId {
    pub fn parse(s: &str) -> Result<LocalId> {
        let ok = !s.is_empty()
            && s.len() <= LOCAL_ID_BYTES_MAX
            && s.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'=' | b'-')
            });
        if !ok {
            return Err(Error::bad_request(format!(
                "invalid local id {s:?}: use 1-64 characters of a-z, 0-9, '.', '_', '=', '-'"
            )));
        }
        Ok(LocalId(s.to_string()))
    }
}

/// A participant's fully qualified id, `@{local_id}:{server_name}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fqid(String);
string_newtype!(Fqid);

impl Fqid {
    pub fn parse(s: &str) -> Result<Fqid> {
        let bad = || {
            Error::bad_request(format!(
                "invalid FQID {s:?}: write it as @local_id:server_name, e.g. @alice:chat.example.com"
            ))
        };
        let (local, server) = sigil_parts(s, '@').ok_or_else(bad)?;
        LocalId::parse(local).map_err(|_| bad())?;
        ServerName::parse(server).map_err(|_| bad())?;
        Ok(Fqid(s.to_string()))
    }

    pub fn new(local: &LocalId, server: &ServerName) -> Fqid {
        Fqid(format!("@{local}:{server}"))
    }

    pub fn local_id(&self) -> LocalId {
        let rest = &self.0[1..];
        LocalId(
            rest.split_once(':')
                .map(|(l, _)| l)
                .unwrap_or(rest)
                .to_string(),
        )
    }

    pub fn server(&self) -> ServerName {
        let rest = &self.0[1..];
        ServerName(
            rest.split_once(':')
                .map(|(_, s)| s)
                .unwrap_or("")
                .to_string(),
        )
    }
}

/// A room id, `!{opaque}:{host server_name}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(String);
string_newtype!(RoomId);

/// Length of the random part of a room id we mint (SPEC §2 asks ≥ 16).
const ROOM_OPAQUE_CHARS: usize = 22;

impl RoomId {
    pub fn parse(s: &str) -> Result<RoomId> {
        let bad = || {
            Error::bad_request(format!(
                "invalid room_id {s:?}: expected !opaque:server_name with at least 16 URL-safe characters before the ':'"
            ))
        };
        let (opaque, server) = sigil_parts(s, '!').ok_or_else(bad)?;
        let opaque_ok = opaque.len() >= 16
            && opaque.len() <= 128
            && opaque
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !opaque_ok {
            return Err(bad());
        }
        ServerName::parse(server).map_err(|_| bad())?;
        Ok(RoomId(s.to_string()))
    }

    /// A fresh room id hosted by `host`.
    pub fn generate(host: &ServerName) -> RoomId {
        use rand::Rng;
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng();
        let opaque: String = (0..ROOM_OPAQUE_CHARS)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        RoomId(format!("!{opaque}:{host}"))
    }

    /// The room's host: the server that created it and orders it (SPEC §6).
    pub fn host(&self) -> ServerName {
        let rest = &self.0[1..];
        ServerName(
            rest.split_once(':')
                .map(|(_, s)| s)
                .unwrap_or("")
                .to_string(),
        )
    }
}

/// An event id: a lower-case hyphenated UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(uuid::Uuid);

impl EventId {
    pub fn parse(s: &str) -> Result<EventId> {
        let bad = || {
            Error::bad_event(format!(
                "invalid event_id {s:?}: use a lower-case hyphenated UUID (v7 recommended)"
            ))
        };
        if s.len() != 36 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad());
        }
        let id = uuid::Uuid::try_parse(s).map_err(|_| bad())?;
        Ok(EventId(id))
    }

    pub fn generate() -> EventId {
        EventId(uuid::Uuid::now_v7())
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> EventId {
        EventId(uuid::Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EventId::parse(&s).map_err(|e| serde::de::Error::custom(e.message))
    }
}

/// `ed25519:` + first 8 chars of unpadded base64url(SHA-256(public key)).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);
string_newtype!(KeyId);

impl KeyId {
    pub fn parse(s: &str) -> Result<KeyId> {
        let ok = s.len() == 16
            && s.starts_with("ed25519:")
            && s[8..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(Error::signature(format!(
                "invalid key id {s:?}: expected ed25519: followed by 8 base64url characters"
            )));
        }
        Ok(KeyId(s.to_string()))
    }

    /// The key id that SPEC §2 derives from a raw public key.
    pub fn derive(public_key: &[u8; 32]) -> KeyId {
        let digest = Sha256::digest(public_key);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
        KeyId(format!("ed25519:{}", &b64[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for ok in [
            "a.example.com",
            "localhost:8448",
            "b-2.test",
            "x:1",
            "1a.example.com",
            "a.1x",
            "0x.test",
        ] {
            assert!(ServerName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A.example.com",
            "a..b",
            "127.0.0.1",
            "a.com:443",
            "a.com:0",
            "a.com:65536",
            "a_b.com",
            "a.com:08",
            // Numeric forms URL parsers read as IPv4 (all 127.0.0.1).
            "2130706433:8448",
            "127.1:8448",
            "0x7f000001:8448",
            "017700000001:8448",
            "0x7f.1",
            "a.b.1",
            "localhost.0x1",
        ] {
            assert!(ServerName::parse(bad).is_err(), "{bad}");
        }
        let s = ServerName::parse("localhost:8448").unwrap();
        assert_eq!(s.host(), "localhost");
        assert_eq!(s.port(), Some(8448));
    }

    #[test]
    fn fqids_split_at_first_colon() {
        let f = Fqid::parse("@bob:b.test:8443").unwrap();
        assert_eq!(f.local_id().as_str(), "bob");
        assert_eq!(f.server().as_str(), "b.test:8443");
        for bad in [
            "bob:b.test",
            "@:b.test",
            "@Bob:b.test",
            "@bob",
            "@bob:",
            "@b b:x.test",
        ] {
            assert!(Fqid::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn room_ids() {
        let host = ServerName::parse("a.test").unwrap();
        let r = RoomId::generate(&host);
        assert_eq!(RoomId::parse(r.as_str()).unwrap().host(), host);
        assert!(RoomId::parse("!short:a.test").is_err());
        assert!(RoomId::parse("Qm3xQm3xQm3xQm3xQm3x:a.test").is_err());
    }

    #[test]
    fn event_ids_are_lower_case_uuids() {
        let id = EventId::generate();
        assert_eq!(EventId::parse(&id.to_string()).unwrap(), id);
        assert!(EventId::parse("0193A2B4-0000-7000-8000-000000000000").is_err());
        assert!(EventId::parse("not-a-uuid").is_err());
        assert!(EventId::parse("0193a2b400007000800000000000000a").is_err());
    }

    #[test]
    fn key_id_derivation() {
        let k = KeyId::derive(&[7u8; 32]);
        assert!(KeyId::parse(k.as_str()).is_ok());
        assert_eq!(k.as_str().len(), 16);
    }
}
