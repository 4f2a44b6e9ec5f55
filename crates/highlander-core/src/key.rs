//! Validated key names.

use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

/// The longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 256;

/// The name of a singleton task, an exclusive group or a queue: non-empty UTF-8, at most
/// [`MAX_KEY_BYTES`] bytes. Keys decoded from the wire are validated the same way.
///
/// Cloning shares the text (the replicated state holds a key in several indexes, and with
/// 100,000 keys the copies were a third of its memory).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Key(Arc<str>);

/// Why a key was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key was the empty string.
    #[error("a key must not be empty")]
    Empty,
    /// The key was longer than [`MAX_KEY_BYTES`].
    #[error("a key must be at most {MAX_KEY_BYTES} bytes, this one has {0}")]
    TooLong(usize),
    /// The key bytes were not UTF-8.
    #[error("a key must be UTF-8")]
    NotUtf8,
}

impl Key {
    /// Validates and wraps a key name.
    pub fn new(name: impl Into<String>) -> Result<Key, KeyError> {
        let name = name.into();
        if name.is_empty() {
            return Err(KeyError::Empty);
        }
        if name.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong(name.len()));
        }
        Ok(Key(Arc::from(name)))
    }

    /// Validates raw bytes as a key name.
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, KeyError> {
        let name = std::str::from_utf8(bytes).map_err(|_| KeyError::NotUtf8)?;
        Key::new(name)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Anything a key can be made from: `&str`, `String`, or a `Key` itself. Conversion
/// validates, so a bad name is a [`KeyError`], never a panic.
pub trait IntoKey {
    /// Validates and converts.
    fn into_key(self) -> Result<Key, KeyError>;
}

impl IntoKey for Key {
    fn into_key(self) -> Result<Key, KeyError> {
        Ok(self)
    }
}

impl IntoKey for &Key {
    fn into_key(self) -> Result<Key, KeyError> {
        Ok(self.clone())
    }
}

impl IntoKey for &str {
    fn into_key(self) -> Result<Key, KeyError> {
        Key::new(self)
    }
}

impl IntoKey for String {
    fn into_key(self) -> Result<Key, KeyError> {
        Key::new(self)
    }
}

impl IntoKey for &String {
    fn into_key(self) -> Result<Key, KeyError> {
        Key::new(self.as_str())
    }
}

impl TryFrom<String> for Key {
    type Error = KeyError;
    fn try_from(name: String) -> Result<Key, KeyError> {
        Key::new(name)
    }
}

impl TryFrom<&str> for Key {
    type Error = KeyError;
    fn try_from(name: &str) -> Result<Key, KeyError> {
        Key::new(name)
    }
}

impl Serialize for Key {
    /// As its text (the same bytes a `String` encodes to).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl From<Key> for String {
    fn from(key: Key) -> String {
        key.0.to_string()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        assert_eq!(Key::new("irc:#chan").unwrap().as_str(), "irc:#chan");
        assert_eq!(Key::new(""), Err(KeyError::Empty));
        assert!(Key::new("x".repeat(256)).is_ok());
        assert_eq!(Key::new("x".repeat(257)), Err(KeyError::TooLong(257)));
        assert_eq!(Key::from_bytes(&[0xff, 0xfe]), Err(KeyError::NotUtf8));
        // A multi-byte character counts by its bytes.
        assert_eq!(Key::new("é".repeat(129)), Err(KeyError::TooLong(258)));
    }

    #[test]
    fn decoding_validates() {
        let bad = crate::codec::encode(&String::new()).unwrap();
        assert!(crate::codec::decode::<Key>(&bad).is_err());
        let good = crate::codec::encode(&Key::new("k").unwrap()).unwrap();
        assert_eq!(crate::codec::decode::<Key>(&good).unwrap().as_str(), "k");
    }
}
