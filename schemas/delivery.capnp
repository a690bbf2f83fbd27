# Delivery Service: store-and-forward queues of opaque MLS messages.
#
# Each recipient, named by its 32-byte Ed25519 identity key, has one FIFO queue.
# Payloads are opaque to the node: it never sees plaintext, only MLS-protected
# bytes (Welcome, Commit, PrivateMessage, ...).
@0x87550e27a85ea8ce;

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
}
