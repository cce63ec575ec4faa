//! Our participants and their bearer tokens, stored hashed: a token is
//! shown once when it is made and can never be read back.

use sha2::{Digest, Sha256};

use crate::error::{Code, Error, Result};
use crate::ids::LocalId;

use super::{Participant, Store, WriteSet, T};

/// A fresh random bearer token (256 bits, hex) and the hash we store.
pub(crate) fn new_token() -> (String, [u8; 32]) {
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let hash = token_hash(&token);
    (token, hash)
}

pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Store {
    pub fn participant(&self, local: &LocalId) -> Result<Option<Participant>> {
        self.get(T::Participants, local.as_str().as_bytes())
    }

    /// Store a new participant and its first token, durably; answers the
    /// token (returned once, stored hashed). `shown_as` names the
    /// participant in the refusal when the local_id is taken.
    pub fn create_participant(&self, p: &Participant, shown_as: &str) -> Result<String> {
        let local = p.local_id.as_bytes();
        if self.contains(T::Participants, local)? {
            return Err(Error::new(
                Code::Conflict,
                format!("participant {shown_as} already exists; pick another local_id"),
            ));
        }
        let (token, hash) = new_token();
        let mut w = WriteSet::default();
        w.put(T::Participants, local.to_vec(), p)?;
        w.put(T::Tokens, hash.to_vec(), &p.local_id)?;
        self.commit(&w)?;
        self.flush_blocking()?;
        Ok(token)
    }

    /// The participant a bearer token belongs to.
    pub fn participant_by_token(&self, token: &str) -> Result<Participant> {
        let unauth = || {
            Error::new(
                Code::Unauthenticated,
                "missing or unknown bearer token; send Authorization: Bearer <token>",
            )
        };
        let local: String = self
            .get(T::Tokens, &token_hash(token))?
            .ok_or_else(unauth)?;
        self.get(T::Participants, local.as_bytes())?
            .ok_or_else(unauth)
    }
}
