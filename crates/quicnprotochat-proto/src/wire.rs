//! Conversions from Cap'n Proto fields to core domain types ("parse, don't
//! validate"): the service and the client work with [`IdentityKey`], never
//! with unchecked bytes.

use quicnprotochat_core::{
    EpochKey, GroupId, IdentityKey, KeyPackageStock, MessageKind, QueuedMessage, Seq, StateKey, Suite,
};

use crate::delivery_capnp;

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
    /// The SHA-256 of `bytes` ([`quicnprotochat_core::fingerprint`]), by
    /// which one stored already is told apart; taken once, here.
    pub fingerprint: [u8; 32],
    /// Whether it carries the `last_resort` extension.
    pub last_resort: bool,
    /// End of its lifetime, Unix seconds; never served after.
    pub expires_at: u64,
    /// Its ciphersuite: it is served only to fetches asking for this one.
    pub suite: Suite,
}

impl ValidKeyPackage {
    /// A record of `bytes` (already validated) with its fingerprint.
    pub fn new(bytes: Vec<u8>, last_resort: bool, expires_at: u64, suite: Suite) -> ValidKeyPackage {
        ValidKeyPackage {
            fingerprint: quicnprotochat_core::fingerprint(&bytes),
            bytes,
            last_resort,
            expires_at,
            suite,
        }
    }
}

/// What a node accepts of a KeyPackage beyond MLS validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPackagePolicy {
    /// Longest lifetime (not_after − not_before), in seconds.
    pub max_lifetime_secs: u64,
    /// Largest encoded size of its extensions, and of its leaf's.
    pub max_extensions_bytes: usize,
}

impl Default for KeyPackagePolicy {
    /// 90 days (openmls makes KeyPackages for 12 weeks and an hour) and
    /// 1 KiB of extensions (a last-resort mark takes 4 bytes).
    fn default() -> Self {
        Self {
            max_lifetime_secs: 90 * 24 * 60 * 60,
            max_extensions_bytes: 1024,
        }
    }
}

/// Checks a KeyPackage field: size as [`payload`], then full MLS validation
/// (signature, version, ciphersuite: one of [`Suite::ALL`], lifetime,
/// credential), `policy`, and that it belongs to `owner`. A KeyPackage
/// wrapped in an MLSMessage is unwrapped.
pub fn key_package(
    field: &str,
    bytes: &[u8],
    max: usize,
    owner: &IdentityKey,
    policy: &KeyPackagePolicy,
) -> Result<ValidKeyPackage, FieldError> {
    // Wrapped in an MLSMessage or not: stored (and served) bare.
    let bytes = quicnprotochat_core::unwrap_key_package(payload(field, bytes, max)?);
    let info = quicnprotochat_core::inspect_key_package(bytes).map_err(|e| FieldError {
        field: field.to_owned(),
        reason: e.to_string(),
    })?;
    let refuse = |reason: String| FieldError {
        field: field.to_owned(),
        reason,
    };
    if info.identity != *owner {
        return Err(refuse(format!(
            "the KeyPackage belongs to {}, not to identityKey {}",
            info.identity.short(),
            owner.short()
        )));
    }
    let lifetime = info.not_after.saturating_sub(info.not_before);
    if lifetime > policy.max_lifetime_secs {
        return Err(refuse(format!(
            "its lifetime is {} days; this node takes KeyPackages valid for at most {} days (RFC 9420, section 7.2)",
            lifetime / 86_400,
            policy.max_lifetime_secs / 86_400
        )));
    }
    if info.extensions_size > policy.max_extensions_bytes {
        return Err(refuse(format!(
            "its extensions take {} bytes; this node takes at most {}",
            info.extensions_size, policy.max_extensions_bytes
        )));
    }
    Ok(ValidKeyPackage::new(
        bytes.to_vec(),
        info.last_resort,
        info.not_after,
        info.suite,
    ))
}

/// Parses a ciphersuite field (a `UInt16` MLS code point) into one of the
/// suites this build speaks; any other value is refused naming those.
pub fn ciphersuite(field: &str, code: u16) -> Result<Suite, FieldError> {
    Suite::from_code(code).ok_or_else(|| {
        let known: Vec<String> = Suite::ALL
            .iter()
            .map(|suite| format!("0x{:04X} ({})", suite.code(), suite.full_name()))
            .collect();
        FieldError {
            field: field.to_owned(),
            reason: format!(
                "0x{code:04X} is not an MLS ciphersuite this node knows; ask for one of {}",
                known.join(", ")
            ),
        }
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
    if list.is_empty() {
        return Err(FieldError {
            field: "envelopes".into(),
            reason: "must hold at least one envelope".into(),
        });
    }
    let mut total_recipients = 0usize;
    let mut parsed = Vec::with_capacity(list.len() as usize);
    for (index, reader) in list.iter().enumerate() {
        let envelope = envelope(&format!("envelopes[{index}]"), reader, max_payload, 1)?;
        total_recipients += envelope.recipients.len();
        if total_recipients > MAX_BATCH_RECIPIENTS {
            return Err(FieldError {
                field: "envelopes".into(),
                reason: format!("more than {MAX_BATCH_RECIPIENTS} recipients in one batch; split it"),
            });
        }
        parsed.push(envelope);
    }
    Ok(parsed)
}

/// Parses one `Envelope` named `field`: at least `min_recipients` recipients
/// (at most [`MAX_BATCH_RECIPIENTS`]), each a 32-byte key, a payload within
/// `max_payload` and an optional message id.
pub fn envelope(
    field: &str,
    reader: crate::delivery_capnp::envelope::Reader<'_>,
    max_payload: usize,
    min_recipients: usize,
) -> Result<Envelope, FieldError> {
    let invalid = |field: String, reason: String| FieldError { field, reason };
    let keys_field = format!("{field}.recipientKeys");
    let recipients = reader
        .get_recipient_keys()
        .map_err(|e| invalid(keys_field.clone(), e.to_string()))?;
    if (recipients.len() as usize) < min_recipients || recipients.len() as usize > MAX_BATCH_RECIPIENTS {
        return Err(invalid(
            keys_field,
            format!("must name {min_recipients} to {MAX_BATCH_RECIPIENTS} recipients"),
        ));
    }
    let recipients = recipients
        .iter()
        .enumerate()
        .map(|(slot, key)| {
            let field = format!("{keys_field}[{slot}]");
            let key = key.map_err(|e| invalid(field.clone(), e.to_string()))?;
            identity_key(&field, key)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let payload_field = format!("{field}.payload");
    let bytes = reader
        .get_payload()
        .map_err(|e| invalid(payload_field.clone(), e.to_string()))?;
    let payload = payload(&payload_field, bytes, max_payload)?.to_vec();
    let id_field = format!("{field}.messageId");
    let id = reader
        .get_message_id()
        .map_err(|e| invalid(id_field.clone(), e.to_string()))?;
    let message_id = message_id(&id_field, id)?;
    Ok(Envelope {
        recipients,
        payload,
        message_id,
    })
}

/// A group change for `publishCommit`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPublication {
    /// The group.
    pub group_id: GroupId,
    /// The epoch the Commit was made in.
    pub epoch: u64,
    /// The Commit and its recipients.
    pub commit: Envelope,
    /// The Welcome and the new members, if any.
    pub welcome: Option<Envelope>,
    /// The group's public state in `epoch`, sent with its first change.
    pub initial_state: Option<GroupState>,
    /// The GroupInfo of `epoch + 1`, for members who rejoin.
    pub group_info: Option<Vec<u8>>,
    /// The key of `epoch + 1` (protocol 8), under which the node seals the
    /// tree it keeps for the members the Commit adds.
    pub epoch_key: Option<EpochKey>,
    /// The group's state key in `epoch` (protocol 9), which opens the
    /// group's state on the node (or seals `initial_state`).
    pub state_key: StateKey,
    /// The state key of `epoch + 1` (protocol 9), when the Commit takes a
    /// device out of the group.
    pub new_state_key: Option<StateKey>,
}

/// A group's public state (`GroupState`): a GroupInfo and the ratchet tree
/// of the same epoch; core's one type for it.
pub use quicnprotochat_core::GroupState;

/// A standalone proposal for `publishProposal`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposalPublication {
    /// The group.
    pub group_id: GroupId,
    /// The epoch the proposal was made in.
    pub epoch: u64,
    /// The proposal and its recipients.
    pub proposal: Envelope,
    /// The group's state key (protocol 9).
    pub state_key: StateKey,
}

/// Parses `publishCommit`'s parameters and checks that the Commit's own
/// framing names the same group and epoch and is a Commit.
pub fn commit_publication(
    params: crate::delivery_capnp::delivery_service::publish_commit_params::Reader<'_>,
    max_payload: usize,
) -> Result<CommitPublication, FieldError> {
    let (group_id, epoch) = group_and_epoch(params.get_group_id(), params.get_epoch())?;
    // A group of one has nobody to send the Commit to, but the Commit is
    // still checked and its epoch still counts.
    let commit = envelope(
        "commit",
        params
            .get_commit()
            .map_err(|e| invalid("commit", e.to_string()))?,
        max_payload,
        0,
    )?;
    check_framing(
        "commit.payload",
        &commit.payload,
        &group_id,
        epoch,
        MessageKind::Commit,
    )?;
    let welcome = if params.has_welcome() {
        let reader = params
            .get_welcome()
            .map_err(|e| invalid("welcome", e.to_string()))?;
        let has_recipients = reader
            .get_recipient_keys()
            .map(|keys| !keys.is_empty())
            .unwrap_or(false);
        if has_recipients {
            Some(envelope("welcome", reader, max_payload, 1)?)
        } else {
            None
        }
    } else {
        None
    };
    let initial_state = if params.has_initial_state() {
        let reader = params
            .get_initial_state()
            .map_err(|e| invalid("initialState", e.to_string()))?;
        let group_info = reader
            .get_group_info()
            .map_err(|e| invalid("initialState.groupInfo", e.to_string()))?;
        let ratchet_tree = reader
            .get_ratchet_tree()
            .map_err(|e| invalid("initialState.ratchetTree", e.to_string()))?;
        Some(GroupState {
            group_info: payload("initialState.groupInfo", group_info, max_payload)?.to_vec(),
            ratchet_tree: payload("initialState.ratchetTree", ratchet_tree, max_payload)?.to_vec(),
        })
    } else {
        None
    };
    let group_info = params
        .get_group_info()
        .map_err(|e| invalid("groupInfo", e.to_string()))?;
    let group_info = if group_info.is_empty() {
        None
    } else {
        Some(payload("groupInfo", group_info, max_payload)?.to_vec())
    };
    let epoch_key = epoch_key("epochKey", params.get_epoch_key())?;
    let state_key = state_key("stateKey", params.get_state_key())?;
    let new_state_key = optional_state_key("newStateKey", params.get_new_state_key())?;
    Ok(CommitPublication {
        group_id,
        epoch,
        commit,
        welcome,
        initial_state,
        group_info,
        epoch_key,
        state_key,
        new_state_key,
    })
}

/// A required [`StateKey`] field (protocol 9): exactly 32 bytes.
pub fn state_key(field: &str, bytes: capnp::Result<&[u8]>) -> Result<StateKey, FieldError> {
    optional_state_key(field, bytes)?.ok_or_else(|| {
        invalid(
            field,
            format!(
                "required (protocol 9): the group's state key, {} bytes",
                StateKey::LEN
            ),
        )
    })
}

/// An optional [`StateKey`] field: empty is none, 32 bytes a key, any other
/// length a mistake.
pub fn optional_state_key(field: &str, bytes: capnp::Result<&[u8]>) -> Result<Option<StateKey>, FieldError> {
    optional_key(field, bytes, StateKey::from_slice)
}

/// An optional 32-byte key field read with `from_slice`: empty is none,
/// 32 bytes a key, any other length a mistake.
fn optional_key<K>(
    field: &str,
    bytes: capnp::Result<&[u8]>,
    from_slice: fn(&[u8]) -> Option<K>,
) -> Result<Option<K>, FieldError> {
    let bytes = bytes.map_err(|e| invalid(field, e.to_string()))?;
    if bytes.is_empty() {
        return Ok(None);
    }
    from_slice(bytes)
        .map(Some)
        .ok_or_else(|| invalid(field, format!("must be empty or 32 bytes, not {}", bytes.len())))
}

/// Most state keys one `enqueueBatch` call may carry.
pub const MAX_BATCH_STATE_KEYS: usize = 16;

/// Parses `enqueueBatch`'s `stateKeys` (protocol 9): at most
/// [`MAX_BATCH_STATE_KEYS`], each exactly 32 bytes.
pub fn state_keys(list: capnp::Result<capnp::data_list::Reader<'_>>) -> Result<Vec<StateKey>, FieldError> {
    let list = list.map_err(|e| invalid("stateKeys", e.to_string()))?;
    if list.len() as usize > MAX_BATCH_STATE_KEYS {
        return Err(invalid(
            "stateKeys",
            format!("at most {MAX_BATCH_STATE_KEYS} keys, got {}", list.len()),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(slot, bytes)| state_key(&format!("stateKeys[{slot}]"), bytes))
        .collect()
}

/// Fills `enqueueBatch`'s `stateKeys`: what [`state_keys`] reads.
pub fn write_state_keys(keys: &[&StateKey], builder: capnp::data_list::Builder<'_>) {
    let mut builder = builder;
    for (slot, key) in keys.iter().enumerate() {
        builder.set(slot as u32, key.as_bytes());
    }
}

/// Parses a key backup's `lookup` (protocol 9): exactly 32 bytes.
pub fn backup_lookup(field: &str, bytes: capnp::Result<&[u8]>) -> Result<[u8; 32], FieldError> {
    let bytes = bytes.map_err(|e| invalid(field, e.to_string()))?;
    <[u8; 32]>::try_from(bytes).map_err(|_| invalid(field, format!("must be 32 bytes, not {}", bytes.len())))
}

/// An optional [`EpochKey`] field: empty is none, 32 bytes a key, any
/// other length a mistake.
pub fn epoch_key(field: &str, bytes: capnp::Result<&[u8]>) -> Result<Option<EpochKey>, FieldError> {
    optional_key(field, bytes, EpochKey::from_slice)
}

/// Fills `keyPackageCount`'s results: what [`read_key_package_stock`]
/// reads.
pub fn write_key_package_stock(
    stock: &KeyPackageStock,
    mut results: crate::auth_capnp::auth_service::key_package_count_results::Builder<'_>,
) {
    results.set_count(stock.count);
    results.set_has_last_resort(stock.has_last_resort);
}

/// Reads `keyPackageCount`'s results.
pub fn read_key_package_stock(
    results: crate::auth_capnp::auth_service::key_package_count_results::Reader<'_>,
) -> KeyPackageStock {
    KeyPackageStock {
        count: results.get_count(),
        has_last_resort: results.get_has_last_resort(),
    }
}

/// Fills an `Envelope`: what [`envelope`] reads.
pub fn write_envelope(
    envelope: &Envelope,
    mut builder: delivery_capnp::envelope::Builder<'_>,
) -> capnp::Result<()> {
    builder.set_payload(&envelope.payload);
    if let Some(id) = &envelope.message_id {
        builder.set_message_id(id);
    }
    let count = u32::try_from(envelope.recipients.len())
        .map_err(|_| capnp::Error::failed("an envelope names more recipients than a list holds".into()))?;
    let mut keys = builder.init_recipient_keys(count);
    for (slot, recipient) in envelope.recipients.iter().enumerate() {
        keys.set(slot as u32, recipient.as_bytes());
    }
    Ok(())
}

/// Fills a `GroupState`.
pub fn write_group_state(state: &GroupState, mut builder: delivery_capnp::group_state::Builder<'_>) {
    builder.set_group_info(&state.group_info);
    builder.set_ratchet_tree(&state.ratchet_tree);
}

/// A [`CommitPublication`] to send, borrowed from its sender.
#[derive(Debug, Clone, Copy)]
pub struct CommitToSend<'a> {
    /// The group.
    pub group_id: &'a GroupId,
    /// The epoch the Commit was made in.
    pub epoch: u64,
    /// The Commit and its recipients.
    pub commit: &'a Envelope,
    /// The Welcome and the new members, if any.
    pub welcome: Option<&'a Envelope>,
    /// The group's public state in `epoch`, with its first change.
    pub initial_state: Option<&'a GroupState>,
    /// The GroupInfo of `epoch + 1`.
    pub group_info: Option<&'a [u8]>,
    /// The key of `epoch + 1` (protocol 8).
    pub epoch_key: Option<&'a EpochKey>,
    /// The group's state key in `epoch` (protocol 9).
    pub state_key: &'a StateKey,
    /// The state key of `epoch + 1`, when the Commit takes a device out.
    pub new_state_key: Option<&'a StateKey>,
}

/// Fills `publishCommit`'s parameters: what [`commit_publication`] reads.
pub fn write_commit_publication(
    mut params: delivery_capnp::delivery_service::publish_commit_params::Builder<'_>,
    publication: &CommitToSend<'_>,
) -> capnp::Result<()> {
    let CommitToSend {
        group_id,
        epoch,
        commit,
        welcome,
        initial_state,
        group_info,
        epoch_key,
        state_key,
        new_state_key,
    } = *publication;
    params.set_group_id(group_id.as_bytes());
    params.set_epoch(epoch);
    write_envelope(commit, params.reborrow().init_commit())?;
    if let Some(welcome) = welcome {
        write_envelope(welcome, params.reborrow().init_welcome())?;
    }
    if let Some(state) = initial_state {
        write_group_state(state, params.reborrow().init_initial_state());
    }
    if let Some(group_info) = group_info {
        params.set_group_info(group_info);
    }
    if let Some(key) = epoch_key {
        params.set_epoch_key(key.as_bytes());
    }
    params.set_state_key(state_key.as_bytes());
    if let Some(key) = new_state_key {
        params.set_new_state_key(key.as_bytes());
    }
    Ok(())
}

/// Fills `publishProposal`'s parameters: what [`proposal_publication`]
/// reads.
pub fn write_proposal_publication(
    mut params: delivery_capnp::delivery_service::publish_proposal_params::Builder<'_>,
    group_id: &GroupId,
    epoch: u64,
    proposal: &Envelope,
    state_key: &StateKey,
) -> capnp::Result<()> {
    params.set_group_id(group_id.as_bytes());
    params.set_epoch(epoch);
    params.set_state_key(state_key.as_bytes());
    write_envelope(proposal, params.init_proposal())
}

/// Parses `publishProposal`'s parameters and checks that the proposal's own
/// framing names the same group and epoch and is a proposal.
pub fn proposal_publication(
    params: crate::delivery_capnp::delivery_service::publish_proposal_params::Reader<'_>,
    max_payload: usize,
) -> Result<ProposalPublication, FieldError> {
    let (group_id, epoch) = group_and_epoch(params.get_group_id(), params.get_epoch())?;
    let proposal = envelope(
        "proposal",
        params
            .get_proposal()
            .map_err(|e| invalid("proposal", e.to_string()))?,
        max_payload,
        0,
    )?;
    check_framing(
        "proposal.payload",
        &proposal.payload,
        &group_id,
        epoch,
        MessageKind::Proposal,
    )?;
    let state_key = state_key("stateKey", params.get_state_key())?;
    Ok(ProposalPublication {
        group_id,
        epoch,
        proposal,
        state_key,
    })
}

fn invalid(field: &str, reason: String) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason,
    }
}

/// Parses a group id field: 1 to [`GroupId::MAX_LEN`] bytes.
pub fn group_id(field: &str, bytes: &[u8]) -> Result<GroupId, FieldError> {
    GroupId::new(bytes.to_vec()).ok_or_else(|| {
        invalid(
            field,
            format!("must be 1 to {} bytes, got {}", GroupId::MAX_LEN, bytes.len()),
        )
    })
}

fn group_and_epoch(group_id_field: capnp::Result<&[u8]>, epoch: u64) -> Result<(GroupId, u64), FieldError> {
    let bytes = group_id_field.map_err(|e| invalid("groupId", e.to_string()))?;
    let group_id = group_id("groupId", bytes)?;
    if epoch >= i64::MAX as u64 {
        return Err(invalid("epoch", "is beyond any epoch a group can reach".into()));
    }
    Ok((group_id, epoch))
}

/// Checks that `payload`'s unencrypted MLS framing names `group_id`, `epoch`
/// and carries `kind`.
fn check_framing(
    field: &str,
    payload: &[u8],
    group_id: &GroupId,
    epoch: u64,
    kind: MessageKind,
) -> Result<(), FieldError> {
    match quicnprotochat_core::classify(payload) {
        Ok(quicnprotochat_core::Incoming::Group {
            group_id: framed_group,
            epoch: framed_epoch,
            kind: framed_kind,
        }) if framed_group == group_id.as_bytes() && framed_epoch == epoch && framed_kind == kind => Ok(()),
        Ok(other) => Err(invalid(
            field,
            format!("is not a {kind:?} of this group in epoch {epoch} (its framing says {other:?})"),
        )),
        Err(e) => Err(invalid(field, e.to_string())),
    }
}

/// Fills a `List(QueuedMessage)` from `messages`, in order: what
/// [`read_messages`] reads.
pub fn write_messages(
    mut list: capnp::struct_list::Builder<'_, delivery_capnp::queued_message::Owned>,
    messages: &[QueuedMessage],
) {
    for (index, message) in messages.iter().enumerate() {
        let mut entry = list.reborrow().get(index as u32);
        entry.set_seq(message.seq.get());
        entry.set_payload(&message.payload);
    }
}

/// Reads a `List(QueuedMessage)`.
pub fn read_messages(
    list: capnp::struct_list::Reader<'_, delivery_capnp::queued_message::Owned>,
) -> capnp::Result<Vec<QueuedMessage>> {
    list.iter()
        .map(|message| {
            Ok(QueuedMessage {
                seq: Seq::new(message.get_seq()),
                payload: message.get_payload()?.to_vec(),
            })
        })
        .collect()
}

/// Most users one `fetchDeviceLists` call may name.
pub const MAX_DEVICE_LIST_FETCH: usize = 256;

/// A fetch answer (`fetch`, `fetchSince`, `fetchWait`, and each push)
/// carries whole messages, oldest first, until their encoded size reaches
/// this many bytes, and always at least one message; the rest stay queued
/// for the next. It bounds what one answer makes the node hold: a peer that
/// asks and never reads holds at most its calls budget of such answers.
pub const FETCH_ANSWER_BYTES: usize = 1024 * 1024;

/// Fills a `SignedDeviceList`.
pub fn write_device_list(
    signed: &quicnprotochat_core::SignedDeviceList,
    mut builder: crate::auth_capnp::signed_device_list::Builder<'_>,
) {
    let list = signed.list();
    builder.set_user_key(list.user().as_bytes());
    builder.set_version(list.version());
    // At most MAX_DEVICES (64) entries: fits a u32.
    let mut devices = builder.reborrow().init_devices(list.devices().len() as u32);
    for (i, device) in list.devices().iter().enumerate() {
        devices.set(i as u32, device.as_bytes());
    }
    builder.set_signature(signed.signature());
}

/// Reads a `SignedDeviceList` as the schema states it: key and signature
/// lengths, 1 to 64 devices, ascending and distinct. The signature is not
/// checked here ([`quicnprotochat_core::SignedDeviceList::verify`] does).
pub fn read_device_list(
    field: &str,
    reader: crate::auth_capnp::signed_device_list::Reader<'_>,
) -> Result<quicnprotochat_core::SignedDeviceList, FieldError> {
    use quicnprotochat_core::device_lists::MAX_DEVICES;
    use quicnprotochat_core::{DeviceList, SignedDeviceList};

    let bad = |name: &str, reason: String| FieldError {
        field: format!("{field}.{name}"),
        reason,
    };
    let unreadable = |name: &str, e: capnp::Error| bad(name, format!("unreadable: {e}"));
    let user = identity_key(
        &format!("{field}.userKey"),
        reader.get_user_key().map_err(|e| unreadable("userKey", e))?,
    )?;
    let devices = reader.get_devices().map_err(|e| unreadable("devices", e))?;
    if devices.is_empty() || devices.len() as usize > MAX_DEVICES {
        return Err(bad(
            "devices",
            format!("must name 1 to {MAX_DEVICES} devices, names {}", devices.len()),
        ));
    }
    let mut keys: Vec<IdentityKey> = Vec::with_capacity(devices.len() as usize);
    for (i, device) in devices.iter().enumerate() {
        let device = device.map_err(|e| unreadable(&format!("devices[{i}]"), e))?;
        let key = identity_key(&format!("{field}.devices[{i}]"), device)?;
        if keys.last().is_some_and(|previous| *previous >= key) {
            return Err(bad(
                &format!("devices[{i}]"),
                "device keys must be distinct and in ascending byte order".into(),
            ));
        }
        keys.push(key);
    }
    let signature = reader.get_signature().map_err(|e| unreadable("signature", e))?;
    let signature: [u8; 64] = signature.try_into().map_err(|_| {
        bad(
            "signature",
            format!(
                "an Ed25519 signature is exactly 64 bytes, got {}",
                signature.len()
            ),
        )
    })?;
    let list =
        DeviceList::new(user, reader.get_version(), keys).map_err(|e| bad("devices", e.to_string()))?;
    Ok(SignedDeviceList::from_parts(list, signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_reads_back_as_written() {
        for envelope in [
            Envelope {
                recipients: vec![IdentityKey::from_bytes([1; 32]), IdentityKey::from_bytes([2; 32])],
                payload: b"ciphertext".to_vec(),
                message_id: Some(vec![7; 16]),
            },
            Envelope {
                recipients: vec![IdentityKey::from_bytes([3; 32])],
                payload: vec![0; 100],
                message_id: None,
            },
        ] {
            let mut message = capnp::message::Builder::new_default();
            write_envelope(&envelope, message.init_root()).unwrap();
            let reader = message
                .get_root_as_reader::<delivery_capnp::envelope::Reader<'_>>()
                .unwrap();
            assert_eq!(super::envelope("envelope", reader, 1024, 1).unwrap(), envelope);
        }
    }

    #[test]
    fn key_packages_beyond_the_nodes_policy_are_refused_naming_the_rule() {
        use openmls::prelude::{
            Capabilities, Extension, ExtensionType, Extensions, KeyPackage, UnknownExtension,
            tls_codec::Serialize as _,
        };
        use quicnprotochat_core::IdentityKeypair;

        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let owner = IdentityKeypair::generate();
        let with_leaf_extension = |suite: Suite, size: usize| {
            let extension = Extension::Unknown(0xff00, UnknownExtension(vec![0x5a; size]));
            KeyPackage::builder()
                .leaf_node_capabilities(Capabilities::new(
                    None,
                    None,
                    Some(&[ExtensionType::Unknown(0xff00)]),
                    None,
                    None,
                ))
                .leaf_node_extensions(Extensions::single(extension).unwrap())
                .build(
                    suite.ciphersuite(),
                    &provider,
                    &owner,
                    owner.credential_with_key(),
                )
                .unwrap()
                .key_package()
                .tls_serialize_detached()
                .unwrap()
        };
        let policy = KeyPackagePolicy::default();
        let check = |bytes: &[u8]| key_package("package", bytes, 1 << 20, &owner.public_key(), &policy);
        // The same extension limit whatever the suite (a hybrid suite's big
        // keys are not extensions).
        for suite in Suite::ALL {
            assert!(check(&with_leaf_extension(suite, 100)).is_ok());
            let err = check(&with_leaf_extension(suite, 900_000)).unwrap_err();
            assert!(err.reason.contains("its extensions take"), "{err:?}");
        }
        // A lifetime of a year is more than 90 days.
        let yearly = quicnprotochat_core::generate_key_package_with(
            &provider,
            &owner,
            quicnprotochat_core::KeyPackageOptions {
                last_resort: false,
                lifetime_seconds: Some(365 * 86_400),
                suite: Default::default(),
            },
        )
        .unwrap();
        let err = check(&yearly).unwrap_err();
        assert!(err.reason.contains("valid for at most 90 days"), "{err:?}");
    }

    #[test]
    fn a_key_package_of_either_suite_is_taken_with_its_suite() {
        use quicnprotochat_core::{IdentityKeypair, KeyPackageOptions};

        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let owner = IdentityKeypair::generate();
        for suite in Suite::ALL {
            let options = KeyPackageOptions {
                suite,
                ..KeyPackageOptions::default()
            };
            let bytes = quicnprotochat_core::generate_key_package_with(&provider, &owner, options).unwrap();
            let valid = key_package(
                "package",
                &bytes,
                crate::DEFAULT_MAX_PAYLOAD,
                &owner.public_key(),
                &KeyPackagePolicy::default(),
            )
            .unwrap();
            assert_eq!(valid.suite, suite);
        }
    }

    #[test]
    fn an_unknown_ciphersuite_is_refused_naming_the_known_ones() {
        assert_eq!(ciphersuite("ciphersuite", 0x0001).unwrap(), Suite::X25519);
        assert_eq!(ciphersuite("ciphersuite", 0x004F).unwrap(), Suite::MlKem768X25519);
        let text = ciphersuite("ciphersuite", 0x0002).unwrap_err().to_string();
        for expected in [
            "ciphersuite: 0x0002",
            "0x0001 (MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519)",
            "0x004F (MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519)",
        ] {
            assert!(text.contains(expected), "{text}");
        }
    }

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

/// What a node says about itself in `ping` (`NodeInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Software version.
    pub version: String,
    /// Wire protocol version.
    pub protocol_version: u16,
    /// Largest payload accepted, in bytes.
    pub max_payload_bytes: u32,
    /// Names the node's database; sequence numbers are only comparable
    /// while it stays the same.
    pub instance_id: Vec<u8>,
}

impl NodeInfo {
    /// Fills the node's answer.
    pub fn write(&self, mut builder: crate::node_capnp::node_info::Builder<'_>) {
        builder.set_version(&self.version);
        builder.set_protocol_version(self.protocol_version);
        builder.set_max_payload_bytes(self.max_payload_bytes);
        builder.set_instance_id(&self.instance_id);
    }

    /// Reads the node's answer.
    pub fn read(reader: crate::node_capnp::node_info::Reader<'_>) -> capnp::Result<NodeInfo> {
        Ok(NodeInfo {
            version: reader
                .get_version()?
                .to_string()
                .map_err(|e| capnp::Error::failed(format!("ping: version is not UTF-8: {e}")))?,
            protocol_version: reader.get_protocol_version(),
            max_payload_bytes: reader.get_max_payload_bytes(),
            instance_id: reader.get_instance_id()?.to_vec(),
        })
    }
}
