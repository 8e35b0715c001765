//! Identifiers: backend ids (which double as DNS labels) and key references.

use std::fmt;
use std::sync::Arc;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Length of the random part of a backend id.
const BACKEND_ID_RANDOM_LEN: usize = 12;

/// A backend's id: lowercase letters and digits, so that it is a valid DNS label and a valid
/// first label of a Host header (`<id>.<domain>`). Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackendId(Arc<str>);

/// Why a string is not a backend id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendIdError {
    #[error("backend id is empty")]
    Empty,
    #[error("backend id is longer than 63 characters")]
    TooLong,
    #[error(
        "backend id may contain only lowercase letters, digits and '-', and may not start or end with '-'"
    )]
    BadCharacter,
}

impl BackendId {
    /// A new random id, `b` followed by 12 base-36 characters (about 62 bits of entropy).
    pub fn generate() -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng();
        let mut s = String::with_capacity(BACKEND_ID_RANDOM_LEN + 1);
        s.push('b');
        for _ in 0..BACKEND_ID_RANDOM_LEN {
            s.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
        }
        BackendId(s.into())
    }

    /// Parses and validates an id (a DNS label: `[a-z0-9-]{1,63}`, no leading or trailing '-').
    pub fn parse(s: &str) -> Result<Self, BackendIdError> {
        validate_label(s)?;
        Ok(BackendId(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks that `s` is a valid backend id without allocating.
pub fn validate_label(s: &str) -> Result<(), BackendIdError> {
    if s.is_empty() {
        return Err(BackendIdError::Empty);
    }
    if s.len() > 63 {
        return Err(BackendIdError::TooLong);
    }
    let b = s.as_bytes();
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Err(BackendIdError::BadCharacter);
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err(BackendIdError::BadCharacter);
    }
    Ok(())
}

impl TryFrom<String> for BackendId {
    type Error = BackendIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate_label(&s)?;
        Ok(BackendId(s.into()))
    }
}

impl From<BackendId> for String {
    fn from(id: BackendId) -> String {
        id.0.to_string()
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendId({})", self.0)
    }
}

impl std::borrow::Borrow<str> for BackendId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The namespace used when a connect names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A key: the application's name for a session (a document, a room, a user), unique within a
/// namespace. A key has at most one live backend at a time.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRef {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// Why a key or namespace is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is longer than 200 characters")]
    TooLong { field: &'static str },
    #[error("{field} may contain only letters, digits and '-', '_', '.', ':', '@'")]
    BadCharacter { field: &'static str },
}

impl KeyRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        KeyRef {
            name: name.into(),
            namespace: namespace.into(),
        }
    }

    /// Validates both parts; the error names the offending field (`key.name`, `key.namespace`).
    pub fn validate(&self) -> Result<(), KeyError> {
        validate_key_part(&self.name, "key.name")?;
        validate_key_part(&self.namespace, "key.namespace")
    }
}

fn validate_key_part(s: &str, field: &'static str) -> Result<(), KeyError> {
    if s.is_empty() {
        return Err(KeyError::Empty { field });
    }
    if s.len() > 200 {
        return Err(KeyError::TooLong { field });
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
    {
        return Err(KeyError::BadCharacter { field });
    }
    Ok(())
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_labels_and_distinct() {
        let a = BackendId::generate();
        let b = BackendId::generate();
        assert_ne!(a, b);
        assert!(BackendId::parse(a.as_str()).is_ok());
        assert_eq!(a.as_str().len(), 13);
    }

    #[test]
    fn id_validation() {
        for (s, ok) in [
            ("abc", true),
            ("a-b-1", true),
            ("", false),
            ("-ab", false),
            ("ab-", false),
            ("AB", false),
            ("a.b", false),
            (&"a".repeat(64), false),
        ] {
            assert_eq!(BackendId::parse(s).is_ok(), ok, "{s:?}");
        }
    }

    #[test]
    fn key_validation_names_the_field() {
        assert!(KeyRef::new("default", "doc-1").validate().is_ok());
        let e = KeyRef::new("default", "").validate().unwrap_err();
        assert!(e.to_string().contains("key.name"));
        let e = KeyRef::new("a b", "x").validate().unwrap_err();
        assert!(e.to_string().contains("key.namespace"));
    }
}
