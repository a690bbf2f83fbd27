# Delivery Service: store-and-forward queues of opaque MLS messages.
#
# Each recipient, named by its 32-byte Ed25519 identity key, has one FIFO queue.
# Payloads are opaque to the node: it never sees plaintext, only MLS-protected
# bytes (Welcome, Commit, PrivateMessage, ...).
#
# Outcomes and exceptions (protocol version 7, for every method of NodeService)
# ------------------------------------------------------------------------------
# An outcome that a correct client must expect and act on comes back in the
# call's results, as a typed value: a Commit that lost the race for its epoch
# (with the group's current epoch), a rate limit (with how long to wait), full
# queues (naming them), no KeyPackage left. Such an outcome never means partial
# success: `accepted` means everything the call carried is durably committed,
# any other outcome means nothing of it was stored.
#
# An exception means the call itself was wrong, or the node could not carry it
# out. Its text is for humans only (it names the field or limit and what to
# do) and may change in any release: never decide anything by it. Decide by
# the exception's type instead (protocol 7):
# - failed:       the call was wrong (a field breaking this schema's rules,
#                 permission denied, an oversize payload). Nothing was
#                 stored, and repeating the same call fails again.
# - overloaded:   nothing was stored; try again later: the node is shutting
#                 down, this session has too many calls unanswered, pings
#                 come too fast, or a storage transaction or read failed.
# - disconnected: the outcome is unknown: the session broke, or the node's
#                 database went away mid-call, or a commit's sync to disk
#                 failed. The call may or may not have taken effect; repeat
#                 it (calls with a messageId are stored at most once) and
#                 never read it as a refusal.
@0x87550e27a85ea8ce;

# One payload and the recipients it is queued for.
struct Envelope {
  # The recipients' raw Ed25519 public keys; each exactly 32 bytes, at least
  # one.
  recipientKeys @0 :List(Data);

  # One opaque message, queued once for every recipient; not empty, at most
  # the node's payload limit (see ping). Stored once however many recipients.
  payload @1 :Data;

  # Optional (empty: none), at most 64 bytes, chosen by the sender: a retry
  # with an id this sender already used is accepted and stores nothing new.
  messageId @2 :Data;
}

# A message waiting in a queue.
struct QueuedMessage {
  # Its sequence number: unique and strictly increasing within the queue,
  # never reused.
  seq @0 :UInt64;

  # The opaque message.
  payload @1 :Data;
}

# The caller sent more than its rate limit allows; nothing was stored.
struct RateLimited {
  # Milliseconds to wait before the same call can pass; at least 1.
  retryAfterMs @0 :UInt32;
}

# Queues without room for what the call would add; nothing was stored.
struct QueueFull {
  # The recipients whose queues are full (each 32 bytes, each named once,
  # in the order the call first named them). A queue is full when its
  # waiting messages plus the ones this call adds to it would exceed
  # `maxDepth`; it has room again once its owner acks.
  recipientKeys @0 :List(Data);

  # The node's limit of messages waiting in one queue.
  maxDepth @1 :UInt32;

  # The node's limit of payload bytes waiting in one queue (protocol 4); a
  # queue is also full when its waiting bytes plus the call's would exceed
  # it.
  maxBytes @2 :UInt64;
}

# The call carries more than the sender may ever queue at once (its burst):
# nothing was stored. Split it into calls within both maxima.
struct TooLarge {
  # Most messages one call may queue (recipients, summed over envelopes).
  maxMessages @0 :UInt32;

  # Most payload bytes one call may carry (each envelope's payload once).
  maxBytes @1 :UInt64;
}

# An application message (an MLS PrivateMessage) encrypted in an epoch its
# group has already left on the node; nothing was stored. Members at the
# newer epoch might not be able to read it: process your queue, then
# encrypt it again.
struct StaleEpoch {
  # The group the message is for.
  groupId @0 :Data;

  # The epoch the group is in now, on the node.
  currentEpoch @1 :UInt64;
}

# What became of `enqueue` or `enqueueBatch`.
struct SendOutcome {
  union {
    # Every message is durably committed to the node's database.
    accepted @0 :Void;

    # Over the sender's budget (messages queued per second, each recipient
    # counting once, and payload bytes per second): wait, then send again.
    rateLimited @1 :RateLimited;

    # Some recipient's queue is full: wait for it to drain, or give up on
    # those recipients.
    queueFull @2 :QueueFull;

    # More than one call may carry (protocol 4): split it.
    tooLarge @3 :TooLarge;

    # A message from an epoch its group has left (protocol 4): catch up,
    # then encrypt and send it again. Answered only to a member of the
    # group (protocol 7) that presents the group's state key (protocol 9,
    # enqueueBatch's stateKeys): anyone else's message is queued as any
    # opaque payload, so it tells nobody whether the group exists.
    staleEpoch @4 :StaleEpoch;

    # A payload is, by its clear MLS framing, a handshake: a Commit or a
    # proposal (PublicMessage, or PrivateMessage whose content type says
    # so) or a Welcome (protocol 7). Group changes go through
    # publishCommit and publishProposal, where the node orders them (one
    # Commit per epoch); sent around that, different members could be made
    # to apply different Commits. Nothing was stored.
    handshake @5 :Void;
  }
}

# Another Commit was accepted for the epoch this one was made in.
struct CommitConflict {
  # The epoch the group is in now, on the node. Process your queue until
  # your group reaches it, then make the change again.
  currentEpoch @0 :UInt64;
}

# A group's public state: what every member (and the node) may see, no
# secret. The group's creator hands it to the node with the group's first
# change (see publishCommit), so the node can check every Commit after.
struct GroupState {
  # The group's GroupInfo (RFC 9420, section 12.4.3) as a TLS-encoded
  # MLSMessage, signed by a member, for the epoch the state describes.
  groupInfo @0 :Data;

  # The group's ratchet tree in that epoch: the TLS encoding of the
  # `ratchet_tree` extension's data (RFC 9420, section 12.4.3.3).
  ratchetTree @1 :Data;
}

# A handshake message the node checked against the group's public state and
# found not valid: its members could not apply it.
struct InvalidMessage {
  # Why, for people (e.g. "not signed by a member of the group"); may
  # change in any release.
  reason @0 :Text;
}

# What became of `publishCommit`.
struct CommitOutcome {
  union {
    # The Commit (and Welcome) is durably committed; the group moved on to
    # the next epoch. Merge your pending Commit.
    accepted @0 :Void;

    # Another member's Commit won this epoch: discard your pending Commit.
    conflict @1 :CommitConflict;

    # Over the sender's rate limit; the change was not published. Wait and
    # publish the same Commit again.
    rateLimited @2 :RateLimited;

    # A recipient's queue is full; the change was not published.
    queueFull @3 :QueueFull;

    # The Commit is not valid for the group as the node knows it (not a
    # PublicMessage, not signed by a member, a bad update path, a proposal
    # the node has not seen, an identity rule broken); nothing was stored.
    invalid @4 :InvalidMessage;

    # The node has no state for this group that the caller's `stateKey`
    # opens, and the call carried none: publish again with `initialState`.
    # Also the answer to a caller who is not a member of a group the node
    # knows (protocol 7), so that a non-member learns neither the group's
    # epoch nor that it exists.
    unknownGroup @5 :Void;
  }
}

# What `fetchGroupInfo` found.
struct FetchedGroupInfo {
  union {
    # The current epoch's GroupInfo and ratchet tree.
    state @0 :GroupState;

    # The node has no GroupInfo of the current epoch (the last Commit
    # carried none): ask a member to update, or wait for the next change.
    unavailable @1 :Void;

    # The caller owns no leaf of the group, the node knows no such group,
    # or the state key presented does not open its state (protocol 9; the
    # three are not told apart, so the answer says nothing about a group to
    # anyone outside it).
    notMember @2 :Void;
  }
}

# What `fetchWelcomeTree` found.
struct FetchedWelcomeTree {
  union {
    # The group's ratchet tree in the asked epoch, TLS-encoded (the data of
    # a ratchet_tree extension, RFC 9420 section 12.4.3.3). Join with it: the
    # MLS library checks it against the tree hash in the Welcome's signed
    # GroupInfo, so a node cannot slip in another tree.
    tree @0 :Data;

    # The node keeps no tree for the caller in that epoch: the Commit that
    # started it was accepted longer ago than the node keeps undelivered
    # messages, no Commit it accepted started that epoch by adding members,
    # or the key presented is not that epoch's (protocol 8; before, that
    # Commit did not add the caller): the same answer, so nobody learns
    # whether a group exists. The Welcome cannot be used;
    # ask to be invited again.
    unavailable @1 :Void;
  }

  # With `tree` (protocol 9): the group's state key (32 bytes, see
  # publishCommit's stateKey), which the joiner keeps and presents with its
  # own calls about the group. Empty for a tree kept before protocol 9.
  stateKey @2 :Data;
}

# What became of `putKeyBackup`.
struct BackupOutcome {
  union {
    # The backup is durably stored, in place of the one before.
    stored @0 :Void;

    # Over the caller's rate limit; nothing was stored.
    rateLimited @1 :RateLimited;

    # The backup is larger than `maxBytes`; nothing was stored.
    tooLarge @2 :BackupTooLarge;
  }
}

# The most a key backup may take.
struct BackupTooLarge {
  maxBytes @0 :UInt32;
}

# What became of `publishProposal`.
struct ProposalOutcome {
  union {
    # The proposal is durably stored for the Commit that will reference it,
    # and queued for its recipients.
    accepted @0 :Void;

    # The group is in another epoch (`currentEpoch`): a proposal counts only
    # in the epoch it was made in. Process your queue and propose again.
    conflict @1 :CommitConflict;

    # Over the sender's rate limit; nothing was stored.
    rateLimited @2 :RateLimited;

    # A recipient's queue is full; nothing was stored.
    queueFull @3 :QueueFull;

    # Not a valid proposal for the group's public state.
    invalid @4 :InvalidMessage;

    # The node has no state for this group, the caller is not one of its
    # members (protocol 7), or its `stateKey` does not open the group's
    # state (protocol 9): the three are not told apart.
    unknownGroup @5 :Void;

    # The group already holds `max` proposals in this epoch (protocol 7):
    # commit them (or wait for a Commit), then propose again.
    tooManyProposals @6 :TooManyProposals;
  }
}

# The most proposals the node keeps for one group and epoch.
struct TooManyProposals {
  max @0 :UInt32;
}

# A client's callback for pushed messages (see DeliveryService.subscribe).
interface MessageReceiver {
  # New messages of the subscribed queue, oldest first. The node makes one
  # call at a time and waits for it to return before the next, so a slow
  # client slows its own stream (backpressure) and nothing else. Return once
  # the messages are safe with you; ack them when you have stored them.
  # Returning an error ends the subscription.
  deliver @0 (messages :List(QueuedMessage)) -> ();
}

# A live subscription. It has no methods: dropping the last reference ends it.
interface Subscription {}

interface DeliveryService {
  # Appends `payload` to the queue of `recipientKey`. Needs an
  # authenticated connection.
  #
  # recipientKey: the recipient's raw Ed25519 public key; exactly 32 bytes.
  # payload:      one opaque message; not empty, at most the node's payload
  #               limit (see ping).
  # messageId:    optional (empty: none), at most 64 bytes: a retry with an id
  #               this sender already used is accepted and stores nothing new.
  # outcome:      `accepted` only after the message is durably committed to
  #               the node's database; `rateLimited` or `queueFull` otherwise.
  #
  # Exceptions (failed): a key that is not 32 bytes, an empty or oversize
  # payload, an anonymous connection. A handshake (Commit, proposal,
  # Welcome) is the typed outcome `handshake`.
  enqueue @0 (recipientKey :Data, payload :Data, messageId :Data) -> (outcome :SendOutcome);

  # Drains the queue of `recipientKey` (kept for simple clients; prefer
  # fetchSince + ack, which lose nothing if the client dies mid-way). Only
  # the owner may call it.
  #
  # recipientKey: the recipient's raw Ed25519 public key; exactly 32 bytes.
  # payloads:     every queued message in the order it was enqueued (oldest
  #               first). The messages are deleted in the same transaction that
  #               reads them, so two concurrent fetches never return the same
  #               message. Empty when the queue is empty or unknown.
  fetch @1 (recipientKey :Data) -> (payloads :List(Data));

  # Queues every envelope's payload for each of its recipients, atomically:
  # when this answers, all of them are durably committed; on error, none is.
  # Clients use it to send a group change (the Commit to the members and the
  # Welcome to the new ones) or a group message as one unit.
  #
  # envelopes: at least one; every key and payload checked as in `enqueue`.
  # outcome:   as in `enqueue`, for the whole batch: `accepted` means every
  #            envelope is committed; otherwise none is. `rateLimited`
  #            counts one message per recipient of every envelope.
  # stateKeys: optional (protocol 9), each exactly 32 bytes, at most 16: the
  #            state keys (see publishCommit's stateKey) of the groups the
  #            envelopes' application messages belong to. The node answers
  #            `staleEpoch` for a message from an epoch its group has left
  #            only to a member presenting a key that opens the group's
  #            state; without one, such a message is queued like any other
  #            (and its readers may no longer be able to decrypt it).
  enqueueBatch @2 (envelopes :List(Envelope), stateKeys :List(Data)) -> (outcome :SendOutcome);

  # Reads, without removing, the messages of `recipientKey` with a sequence
  # number above `afterSeq`, oldest first: at most `limit` (0: no limit of
  # our own) and at most 1 MiB of payloads (or a single larger message).
  # Only the owner may call it.
  fetchSince @3 (recipientKey :Data, afterSeq :UInt64, limit :UInt32) -> (messages :List(QueuedMessage));

  # Deletes the messages of `recipientKey` with a sequence number up to and
  # including `upToSeq`, once the client has stored them. Only the owner may
  # call it.
  ack @4 (recipientKey :Data, upToSeq :UInt64) -> ();

  # Publishes a group change, accepting exactly one valid Commit per group
  # and epoch: the first. Needs an authenticated connection, as the member
  # who made the Commit.
  #
  # groupId:      the MLS group id, 1 to 256 bytes.
  # epoch:        the epoch the Commit was made in.
  # commit:       the Commit, a TLS-encoded MLSMessage carrying a
  #               PublicMessage (handshake messages are never encrypted, so
  #               the node can check them), and its recipients: every member
  #               device the new epoch keeps but the sender and those it adds
  #               (protocol 7; else `invalid`), so none when there are none.
  # welcome:      optional (no recipients: none): the Welcome for new members,
  #               delivered only together with the Commit. It must be an
  #               MLSMessage carrying a Welcome, for devices the Commit adds
  #               only (protocol 7; else `invalid`).
  # initialState: only with the group's first change (the node has no state
  #               for the group yet): the group's public state in `epoch`,
  #               from which the node checks this and every later Commit.
  #               Ignored once the node has the group's state.
  # groupInfo:    required (protocol 7): the GroupInfo of the epoch this
  #               Commit starts (`epoch + 1`), a TLS-encoded MLSMessage
  #               signed by the committer, normally without the
  #               ratchet_tree extension (a GroupInfo that carries it is
  #               accepted too), with the `external_pub` extension (RFC
  #               9420, section 12.4.3.2). The node checks it (the group
  #               context must be the one the Commit leads to) and serves
  #               it, with the tree, to members who rejoin
  #               (fetchGroupInfo). A member that cannot process an
  #               accepted Commit (the node cannot check its membership
  #               tag or the path secrets sent to each member) rejoins from
  #               it by external commit, so no member can freeze a group.
  #               A Commit without it, or without `external_pub`, is
  #               `invalid`.
  # epochKey:     32 bytes (protocol 8): the key of the epoch this Commit
  #               starts, MLS-Exporter("quicnprotochat epoch key", "", 32)
  #               of epoch `epoch + 1` (RFC 9420, section 8.5), which the
  #               committer computes from its pending Commit. Required when
  #               the Commit adds members (else `invalid`): the node keeps
  #               the new epoch's ratchet tree for them sealed under it
  #               (AES-256-GCM), and only a caller that presents it reads the
  #               tree (fetchWelcomeTree), so the node need not store who the
  #               joiners are. The node holds the key in memory for this
  #               call only. Empty: none; any other length is a `failed`
  #               exception.
  # stateKey:     32 bytes (protocol 9): the group's state key as the caller
  #               holds it in `epoch`. The node keeps the group's public
  #               state (tree, context, GroupInfo, proposals) sealed under
  #               it (AES-256-GCM) and holds the key in memory for this call
  #               only. A group's state key is MLS-Exporter("quicnprotochat
  #               state key", "", 32) of the last epoch started by a Commit
  #               that took a device out of the group (a device with a leaf
  #               in the epoch before and none after), or of epoch 0 for a
  #               group that never lost one; a member keeps it from one such
  #               Commit to the next, a joiner gets it from fetchWelcomeTree.
  #               A key that does not open the group's state is answered as
  #               a group the node does not know (`unknownGroup`: hand over
  #               `initialState`, which the node takes only in exactly the
  #               state it last knew the group in). With `initialState`, the
  #               key the node seals that state under. Required (else a
  #               `failed` exception).
  # newStateKey:  32 bytes (protocol 9), required when the Commit takes a
  #               device out of the group (else `invalid`), empty otherwise:
  #               the state key of epoch `epoch + 1`, which the committer
  #               computes from its pending Commit. The node keeps the new
  #               state under it, so the removed device's key opens nothing
  #               written after.
  # outcome:      `accepted`: the Commit and the Welcome are durably
  #               committed in one transaction and the group is at
  #               `epoch + 1`. `conflict`: another Commit was already accepted
  #               for `epoch` (or the group is at another epoch); it carries
  #               the group's current epoch: process your queue, then redo the
  #               change. `invalid`: the Commit is not valid for the group's
  #               public state. `unknownGroup`: send `initialState`.
  #               `rateLimited`, `queueFull`: as in `enqueueBatch`. Anything
  #               but `accepted` stored nothing.
  #
  # The node checks a Commit as RFC 9750 allows a Delivery Service to:
  # framing, epoch, the signature of a current member (the caller's own
  # leaf), proposals by value and by reference (see publishProposal), the
  # update path's public keys and parent hashes, and that every leaf's
  # credential is a basic credential equal to its signature key with no
  # identity twice. It cannot check what only members can (the path's
  # encrypted secrets, the confirmation and membership tags' values). A
  # retry of an accepted publication (same sender and commit messageId) is
  # `accepted` again without storing anything.
  publishCommit @5 (groupId :Data, epoch :UInt64, commit :Envelope, welcome :Envelope,
                    initialState :GroupState, groupInfo :Data, epochKey :Data,
                    stateKey :Data, newStateKey :Data)
      -> (outcome :CommitOutcome);

  # Pushes the messages of `recipientKey` after `afterSeq` to `receiver`
  # as soon as they are committed, in order, until the returned subscription
  # is dropped, the connection closes or `deliver` fails. Messages are not
  # removed: ack them. Only the owner may subscribe.
  subscribe @6 (recipientKey :Data, afterSeq :UInt64, receiver :MessageReceiver)
      -> (subscription :Subscription);

  # Long poll for clients that cannot host a capability: like fetchSince,
  # but if there is nothing after `afterSeq` yet, waits up to `timeoutMs`
  # (at most 60,000) for messages to arrive. An empty answer means none came.
  # Only the owner may call it.
  fetchWait @7 (recipientKey :Data, afterSeq :UInt64, limit :UInt32, timeoutMs :UInt32)
      -> (messages :List(QueuedMessage));

  # Publishes a standalone proposal (e.g. the Remove a member sends to leave)
  # to its recipients, after checking it against the group's public state
  # as publishCommit checks a Commit; the node keeps it so that a Commit of
  # the same epoch may reference it. Needs an authenticated connection, as
  # the member who made it.
  #
  # groupId:  the MLS group id.
  # epoch:    the epoch the proposal was made in.
  # proposal: the proposal, a TLS-encoded MLSMessage carrying a
  #           PublicMessage, and its recipients.
  # stateKey: 32 bytes (protocol 9; else a `failed` exception): the group's
  #           state key, as in publishCommit. The node keeps the proposal
  #           sealed under it.
  # outcome:  see ProposalOutcome; anything but `accepted` stored nothing.
  publishProposal @8 (groupId :Data, epoch :UInt64, proposal :Envelope, stateKey :Data)
      -> (outcome :ProposalOutcome);

  # The current public state of a group (GroupInfo and ratchet tree), for a
  # member to rejoin by external commit when it lost its state (a wiped
  # device): the node accepts such a Commit only from an identity that
  # already owns a leaf of the group, and only if it removes that leaf, so a
  # stranger who got hold of a GroupInfo cannot join. Needs a connection
  # authenticated as a member of the group (an identity with a leaf in its
  # current tree) that presents the group's state key; anyone else gets
  # `notMember`. A device restored from a backup of its identity alone
  # finds the key in its key backup (fetchKeyBackup).
  #
  # groupId:  the MLS group id.
  # stateKey: 32 bytes (protocol 9; else a `failed` exception): the group's
  #           state key, as in publishCommit.
  fetchGroupInfo @9 (groupId :Data, stateKey :Data) -> (outcome :FetchedGroupInfo);

  # The ratchet tree a new member needs with its Welcome. Welcomes do not
  # carry the tree (it grows by ~350 bytes per member and would stop groups
  # at the payload limit): the node keeps the tree of every epoch started by
  # a Commit that adds members, for as long as it keeps undelivered messages,
  # sealed under that epoch's key (see publishCommit's epochKey), and serves
  # it to whoever presents the key: the members that Commit added compute
  # it from their Welcome alone (the exporter of the epoch the Welcome
  # starts), before they have the tree. Anyone else gets `unavailable`. A
  # Welcome whose GroupInfo carries the tree (other clients may send one)
  # needs no call.
  #
  # groupId:  the MLS group id, as in the Welcome's GroupInfo.
  # epoch:    the epoch the Welcome starts, as in its GroupInfo.
  # epochKey: 32 bytes (protocol 8): MLS-Exporter("quicnprotochat epoch
  #           key", "", 32) of that epoch. Empty: the node serves only a
  #           tree it kept before protocol 8, to a connection authenticated
  #           as one of the members the Commit added; any other length is
  #           a `failed` exception.
  fetchWelcomeTree @10 (groupId :Data, epoch :UInt64, epochKey :Data) -> (outcome :FetchedWelcomeTree);

  # Keeps a device's key backup (protocol 9): its groups' ids and state
  # keys, sealed by the device under a key only it derives, replacing the
  # one kept before. The node files it under SHA-256("quicnprotochat key
  # backup" || lookup) and never stores `lookup`, so a copy of its database
  # tells neither whose backup a row is nor what it holds, and only a holder
  # of `lookup` reads or replaces it. Kept until replaced. Needs an
  # authenticated connection (any identity: the node does not learn whose
  # backup it is).
  #
  # lookup: exactly 32 bytes (else a `failed` exception), derived by the
  #         device from its identity secret (HKDF-SHA256 with info
  #         "quicnprotochat key backup lookup"; see docs/protocol.md).
  # backup: the sealed backup, at most 65,536 bytes (else `tooLarge`).
  putKeyBackup @11 (lookup :Data, backup :Data) -> (outcome :BackupOutcome);

  # The key backup kept under `lookup` (see putKeyBackup); empty if none.
  fetchKeyBackup @12 (lookup :Data) -> (backup :Data);
}
