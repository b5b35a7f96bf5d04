//! The one place that knows the binary encoding of replicated and RPC data.
//!
//! bincode 2 (serde mode) today; bincode 3 is a tombstone, so every caller goes
//! through these two functions and a maintained bincode-compatible crate can
//! replace it without touching them.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| Error::Codec(e.to_string()))
}

/// Decodes a whole buffer; trailing bytes are an error (a frame holds one value).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| Error::Codec(e.to_string()))?;
    if read != bytes.len() {
        return Err(Error::Codec(format!(
            "{} trailing bytes after the value",
            bytes.len() - read
        )));
    }
    Ok(value)
}
