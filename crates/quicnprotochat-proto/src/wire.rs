//! Conversions from Cap'n Proto fields to core domain types ("parse, don't
//! validate"): the service and the client work with [`IdentityKey`], never
//! with unchecked bytes.

use quicnprotochat_core::IdentityKey;

/// A field a peer sent that does not hold what the schema requires.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The schema's name of the field, e.g. `recipientKey` or
    /// `envelopes[2].recipientKeys[0]`.
    pub field: String,
    /// What is wrong with it and what was expected.
    pub reason: String,
}

/// Parses a 32-byte Ed25519 identity key field.
pub fn identity_key(field: &str, bytes: &[u8]) -> Result<IdentityKey, FieldError> {
    IdentityKey::try_from(bytes).map_err(|_| FieldError {
        field: field.to_owned(),
        reason: format!(
            "an identity key must be exactly 32 bytes (a raw Ed25519 public key), got {}",
            bytes.len()
        ),
    })
}

/// Checks a payload field: not empty and at most `max` bytes.
pub fn payload<'a>(field: &str, bytes: &'a [u8], max: usize) -> Result<&'a [u8], FieldError> {
    if bytes.is_empty() {
        return Err(FieldError {
            field: field.to_owned(),
            reason: "must not be empty".into(),
        });
    }
    if bytes.len() > max {
        return Err(FieldError {
            field: field.to_owned(),
            reason: format!("{} bytes exceeds this node's limit of {max} bytes", bytes.len()),
        });
    }
    Ok(bytes)
}

/// A KeyPackage that passed validation for its uploader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidKeyPackage {
    /// Its bytes, as uploaded.
    pub bytes: Vec<u8>,
    /// Whether it carries the `last_resort` extension.
    pub last_resort: bool,
    /// End of its lifetime, Unix seconds; never served after.
    pub expires_at: u64,
}

/// Checks a KeyPackage field: size as [`payload`], then full MLS validation
/// (signature, version, ciphersuite, lifetime, credential) and that it
/// belongs to `owner`.
pub fn key_package(
    field: &str,
    bytes: &[u8],
    max: usize,
    owner: &IdentityKey,
) -> Result<ValidKeyPackage, FieldError> {
    let bytes = payload(field, bytes, max)?;
    let info = quicnprotochat_core::inspect_key_package(bytes).map_err(|e| FieldError {
        field: field.to_owned(),
        reason: e.to_string(),
    })?;
    if info.identity != *owner {
        return Err(FieldError {
            field: field.to_owned(),
            reason: format!(
                "the KeyPackage belongs to {}, not to identityKey {}",
                info.identity.short(),
                owner.short()
            ),
        });
    }
    Ok(ValidKeyPackage {
        bytes: bytes.to_vec(),
        last_resort: info.last_resort,
        expires_at: info.not_after,
    })
}

/// Most recipients one `enqueueBatch` call may name in all its envelopes.
pub const MAX_BATCH_RECIPIENTS: usize = 100_000;

/// One payload and the recipients it is queued for (`delivery.capnp`'s
/// `Envelope`, checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Who gets the payload; at least one.
    pub recipients: Vec<IdentityKey>,
    /// The opaque message.
    pub payload: Vec<u8>,
    /// The sender's id for it, for idempotent retries.
    pub message_id: Option<Vec<u8>>,
}

/// Longest message id accepted.
pub const MAX_MESSAGE_ID: usize = 64;

/// Parses an optional message id field (empty: none).
pub fn message_id(field: &str, bytes: &[u8]) -> Result<Option<Vec<u8>>, FieldError> {
    if bytes.len() > MAX_MESSAGE_ID {
        return Err(FieldError {
            field: field.to_owned(),
            reason: format!("at most {MAX_MESSAGE_ID} bytes, got {}", bytes.len()),
        });
    }
    Ok((!bytes.is_empty()).then(|| bytes.to_vec()))
}

/// Parses the `envelopes` parameter of `enqueueBatch`.
pub fn envelopes(
    list: capnp::struct_list::Reader<'_, crate::delivery_capnp::envelope::Owned>,
    max_payload: usize,
) -> Result<Vec<Envelope>, FieldError> {
    let invalid = |field: String, reason: String| FieldError { field, reason };
    if list.is_empty() {
        return Err(invalid(
            "envelopes".into(),
            "must hold at least one envelope".into(),
        ));
    }
    let mut total_recipients = 0usize;
    let mut parsed = Vec::with_capacity(list.len() as usize);
    for (index, envelope) in list.iter().enumerate() {
        let recipients = envelope
            .get_recipient_keys()
            .map_err(|e| invalid(format!("envelopes[{index}].recipientKeys"), e.to_string()))?;
        if recipients.is_empty() {
            return Err(invalid(
                format!("envelopes[{index}].recipientKeys"),
                "must name at least one recipient".into(),
            ));
        }
        total_recipients += recipients.len() as usize;
        if total_recipients > MAX_BATCH_RECIPIENTS {
            return Err(invalid(
                "envelopes".into(),
                format!("more than {MAX_BATCH_RECIPIENTS} recipients in one batch; split it"),
            ));
        }
        let recipients = recipients
            .iter()
            .enumerate()
            .map(|(slot, key)| {
                let field = format!("envelopes[{index}].recipientKeys[{slot}]");
                let key = key.map_err(|e| invalid(field.clone(), e.to_string()))?;
                identity_key(&field, key)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let field = format!("envelopes[{index}].payload");
        let bytes = envelope
            .get_payload()
            .map_err(|e| invalid(field.clone(), e.to_string()))?;
        let payload = payload(&field, bytes, max_payload)?.to_vec();
        let field = format!("envelopes[{index}].messageId");
        let id = envelope
            .get_message_id()
            .map_err(|e| invalid(field.clone(), e.to_string()))?;
        let message_id = message_id(&field, id)?;
        parsed.push(Envelope {
            recipients,
            payload,
            message_id,
        });
    }
    Ok(parsed)
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
