//! Conversions from Cap'n Proto fields to core domain types ("parse, don't
//! validate"): the service and the client work with [`IdentityKey`], never
//! with unchecked bytes.

use quicnprotochat_core::IdentityKey;

/// A field a peer sent that does not hold what the schema requires.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The schema's name of the field, e.g. `recipientKey`.
    pub field: &'static str,
    /// What is wrong with it and what was expected.
    pub reason: String,
}

/// Parses a 32-byte Ed25519 identity key field.
pub fn identity_key(field: &'static str, bytes: &[u8]) -> Result<IdentityKey, FieldError> {
    IdentityKey::try_from(bytes).map_err(|_| FieldError {
        field,
        reason: format!(
            "an identity key must be exactly 32 bytes (a raw Ed25519 public key), got {}",
            bytes.len()
        ),
    })
}

/// Checks a payload field: not empty and at most `max` bytes.
pub fn payload<'a>(field: &'static str, bytes: &'a [u8], max: usize) -> Result<&'a [u8], FieldError> {
    if bytes.is_empty() {
        return Err(FieldError {
            field,
            reason: "must not be empty".into(),
        });
    }
    if bytes.len() > max {
        return Err(FieldError {
            field,
            reason: format!("{} bytes exceeds this node's limit of {max} bytes", bytes.len()),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_key_error_names_the_field_and_length() {
        let err = identity_key("recipientKey", &[0u8; 31]).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("recipientKey:"), "{text}");
        assert!(text.contains("got 31"), "{text}");
        assert!(identity_key("recipientKey", &[7u8; 32]).is_ok());
    }

    #[test]
    fn payload_must_be_non_empty_and_within_the_limit() {
        assert!(payload("payload", b"", 10).is_err());
        assert!(
            payload("payload", &[0u8; 11], 10)
                .unwrap_err()
                .to_string()
                .contains("limit of 10")
        );
        assert_eq!(payload("payload", b"abc", 10).unwrap(), b"abc");
    }
}
