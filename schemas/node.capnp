# NodeService: the bootstrap capability of a quicnprotochat node.
#
# Transport: QUIC (RFC 9000) with TLS 1.3, ALPN "quicnprotochat/1". On each
# connection the client opens one bidirectional stream and speaks standard
# Cap'n Proto two-party RPC over it (rpc.capnp, standard stream framing, no
# extra header). The bootstrap capability is a NodeService.
@0xaaa04b3f51e7c957;

using Auth = import "auth.capnp";
using Delivery = import "delivery.capnp";

# What a node says about itself.
struct NodeInfo {
  # The node software's version, e.g. "0.1.0".
  version @0 :Text;

  # The wire protocol version; bumped on incompatible changes. Currently 9
  # (2: typed outcomes in results; 3: the node checks group changes; see
  # delivery.capnp; 4: typed upload outcomes; 5: device lists, see
  # auth.capnp; 6: KeyPackages per ciphersuite, the hybrid ML-KEM-768 +
  # X25519 suite; 7: an unknown outcome is `disconnected`, never `failed`;
  # group answers only for members; handshakes only through
  # publishCommit/publishProposal; bounded proposals and device list
  # versions; 8: a Commit that adds members carries the new epoch's key,
  # under which the node seals the joiners' ratchet tree, and
  # fetchWelcomeTree takes that key instead of asking who the caller is;
  # 9: the group's public state sealed under its state key, which members
  # present with every call about the group, and key backups; see
  # delivery.capnp).
  protocolVersion @1 :UInt16;

  # The largest KeyPackage or message payload, in bytes, the node accepts.
  maxPayloadBytes @2 :UInt32;

  # 16 random bytes naming this node's database. Queue sequence numbers are
  # only comparable while it stays the same: a client that remembers the
  # highest sequence number it stored must forget it when this changes.
  instanceId @3 :Data;
}

interface NodeService extends(Auth.AuthService, Delivery.DeliveryService) {
  # Liveness check that also tells the client what it is talking to. Anyone
  # may call it. More than the node's ping rate (per identity, or per
  # address when anonymous) is misuse and raises an `overloaded` exception.
  ping @0 () -> (info :NodeInfo);
}
