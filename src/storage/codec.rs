//! The one place that knows how stored values are encoded (bincode 2 over
//! serde), so the format can be swapped without touching callers.

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Result};

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| Error::internal("encode", e))
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    bincode::serde::decode_from_slice(bytes, config())
        .map(|(v, _)| v)
        .map_err(|e| Error::internal("decode", e))
}
