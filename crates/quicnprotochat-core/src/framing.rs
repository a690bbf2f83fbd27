//! MLS framing read from a message's clear header (RFC 9420, section 6),
//! without openmls and without decoding the rest: what a delivery service
//! needs to route a message it may not look into. Anything that is not MLS
//! as expected reads as opaque.

/// The group id and epoch in the clear header of an MLS PrivateMessage
/// (RFC 9420, section 6: version mls10, wire format mls_private_message,
/// then `group_id<V>` and `epoch`); `None` for any other payload, which the
/// node treats as opaque.
pub fn private_message_epoch(payload: &[u8]) -> Option<(&[u8], u64)> {
    private_header(payload).map(|header| (header.group, header.epoch))
}

/// Whether `payload` is, by its clear MLS framing (RFC 9420, section 6), a
/// handshake: a PublicMessage (which carries only proposals and Commits), a
/// PrivateMessage whose content type is a proposal or a Commit, or a
/// Welcome. Such messages must reach members through the node's ordering
/// (`publishCommit`, `publishProposal`), never as plain queued payloads.
/// Anything else, MLS or not, is opaque.
pub fn is_handshake(payload: &[u8]) -> bool {
    const MLS10: [u8; 2] = [0x00, 0x01];
    const PUBLIC: [u8; 2] = [0x00, 0x01];
    const WELCOME: [u8; 2] = [0x00, 0x03];
    // ContentType (RFC 9420, section 6): proposal(2), commit(3).
    const PROPOSAL: u8 = 2;
    const COMMIT: u8 = 3;
    match (payload.get(..2), payload.get(2..4)) {
        (Some(version), Some(format)) if version == MLS10 && (format == PUBLIC || format == WELCOME) => true,
        _ => private_header(payload).is_some_and(|header| matches!(header.content_type, PROPOSAL | COMMIT)),
    }
}

/// Whether `payload` is, by its clear MLS framing, an MLS Welcome (version
/// mls10, wire format mls_welcome): what the Welcome envelope of a Commit
/// must carry.
pub fn is_welcome(payload: &[u8]) -> bool {
    payload.starts_with(&[0x00, 0x01, 0x00, 0x03])
}

/// Whether `payload` is, by its clear MLS framing, an external Commit (a
/// PublicMessage whose sender type is new_member_commit, RFC 9420 section
/// 6): the only kind the node accepts is a member's rejoin. Reads the
/// header only, so it costs nothing beside the Commit's full check.
pub fn is_external_commit(payload: &[u8]) -> bool {
    // SenderType (RFC 9420, section 6): new_member_commit(4).
    const NEW_MEMBER_COMMIT: u8 = 4;
    let Some(rest) = payload.strip_prefix(&[0x00, 0x01, 0x00, 0x01]) else {
        return false;
    };
    framed_group_and_epoch(rest).is_some_and(|(_, _, rest)| rest.first() == Some(&NEW_MEMBER_COMMIT))
}

/// The clear part of an MLS PrivateMessage.
struct PrivateHeader<'a> {
    group: &'a [u8],
    epoch: u64,
    content_type: u8,
}

/// Reads the clear header of an MLS PrivateMessage: version mls10, wire
/// format mls_private_message, `group_id<V>`, `epoch`, `content_type`.
fn private_header(payload: &[u8]) -> Option<PrivateHeader<'_>> {
    let rest = payload.strip_prefix(&[0x00, 0x01, 0x00, 0x02])?;
    let (group, epoch, rest) = framed_group_and_epoch(rest)?;
    Some(PrivateHeader {
        group,
        epoch,
        content_type: *rest.first()?,
    })
}

/// Reads `group_id<V>` and `epoch`, which both MLS framings start with;
/// returns them and the rest.
fn framed_group_and_epoch(rest: &[u8]) -> Option<(&[u8], u64, &[u8])> {
    // The group id's size: a QUIC-style variable-length integer of 1 or 2
    // bytes (group ids are at most 256 bytes here).
    let first = *rest.first()?;
    let (len, rest) = match first >> 6 {
        0 => (usize::from(first & 0x3f), rest.get(1..)?),
        1 => (
            (usize::from(first & 0x3f) << 8) | usize::from(*rest.get(1)?),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    let group = rest.get(..len)?;
    let epoch = u64::from_be_bytes(rest.get(len..len + 8)?.try_into().ok()?);
    Some((group, epoch, rest.get(len + 8..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clear start of an MLS message of `wire_format` for group `g` in
    /// epoch 7, followed by `next` (a PrivateMessage's content type, a
    /// PublicMessage's sender type).
    fn framed(wire_format: u8, next: u8) -> Vec<u8> {
        let mut message = vec![0x00, 0x01, 0x00, wire_format, 0x01, b'g'];
        message.extend_from_slice(&7u64.to_be_bytes());
        message.extend_from_slice(&[next, 0xa5, 0xa5]);
        message
    }

    #[test]
    fn handshakes_and_external_commits_are_told_by_their_clear_framing() {
        // PublicMessages (proposals and Commits only) and Welcomes.
        assert!(is_handshake(&framed(1, 1)));
        assert!(is_handshake(&[0x00, 0x01, 0x00, 0x03, 0x42]));
        // PrivateMessages by their content type: proposal, commit; not
        // application.
        assert!(is_handshake(&framed(2, 2)));
        assert!(is_handshake(&framed(2, 3)));
        assert!(!is_handshake(&framed(2, 1)));
        assert_eq!(private_message_epoch(&framed(2, 1)), Some((&b"g"[..], 7)));
        // GroupInfos, KeyPackages, other versions and anything else: opaque.
        for opaque in [
            framed(4, 1),
            framed(5, 1),
            vec![0x00, 0x02, 0x00, 0x01],
            b"hello".to_vec(),
            Vec::new(),
        ] {
            assert!(!is_handshake(&opaque), "{opaque:?}");
        }
        // A PublicMessage from new_member_commit (4) is an external Commit;
        // from a member (1), or a PrivateMessage, not.
        assert!(is_external_commit(&framed(1, 4)));
        assert!(!is_external_commit(&framed(1, 1)));
        assert!(!is_external_commit(&framed(2, 4)));
        assert!(!is_external_commit(&framed(1, 4)[..14]));
    }
}
