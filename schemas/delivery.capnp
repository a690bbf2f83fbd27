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
  # the node's payload limit (see ping).
  payload @1 :Data;
}

interface DeliveryService {
  # Appends `payload` to the queue of `recipientKey`.
  #
  # recipientKey: the recipient's raw Ed25519 public key; exactly 32 bytes.
  # payload:      one opaque message; not empty, at most the node's payload
  #               limit (see ping).
  #
  # Answers only after the message is durably committed to the node's
  # database. Errors: a key that is not 32 bytes, an empty or oversize payload.
  enqueue @0 (recipientKey :Data, payload :Data) -> ();

  # Drains the queue of `recipientKey`.
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
}
