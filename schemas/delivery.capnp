# Delivery Service: store-and-forward queues of opaque MLS messages.
#
# Each recipient, named by its 32-byte Ed25519 identity key, has one FIFO queue.
# Payloads are opaque to the node: it never sees plaintext, only MLS-protected
# bytes (Welcome, Commit, PrivateMessage, ...).
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
  #
  # Answers only after the message is durably committed to the node's
  # database. Errors: a key that is not 32 bytes, an empty or oversize payload.
  enqueue @0 (recipientKey :Data, payload :Data, messageId :Data) -> ();

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
  enqueueBatch @2 (envelopes :List(Envelope)) -> ();

  # Reads, without removing, the messages of `recipientKey` with a sequence
  # number above `afterSeq`, oldest first: at most `limit` (0: no limit of
  # our own) and at most about 16 MiB. Only the owner may call it.
  fetchSince @3 (recipientKey :Data, afterSeq :UInt64, limit :UInt32) -> (messages :List(QueuedMessage));

  # Deletes the messages of `recipientKey` with a sequence number up to and
  # including `upToSeq`, once the client has stored them. Only the owner may
  # call it.
  ack @4 (recipientKey :Data, upToSeq :UInt64) -> ();

  # Publishes a group change, accepting exactly one Commit per group and
  # epoch: the first. `commit` carries a Commit (an MLS message whose
  # unencrypted framing must name `groupId` and `epoch`) for its recipients;
  # `welcome`, if it has recipients, carries the Welcome for new members and
  # is delivered only together with the Commit. Both are committed in one
  # transaction. If a Commit for this group was already accepted for `epoch`
  # (or a later epoch), nothing is stored and the call fails with
  # "commit conflict: …" naming the group's current epoch: process your
  # queue, then redo the change. The node keeps only the group id and its
  # current epoch for this. Needs an authenticated connection.
  publishCommit @5 (groupId :Data, epoch :UInt64, commit :Envelope, welcome :Envelope) -> ();

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
}
