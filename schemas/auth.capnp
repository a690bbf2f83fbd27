# Authentication Service: a directory of MLS KeyPackages.
#
# A KeyPackage (RFC 9420, section 10) lets anyone add its owner to an MLS group
# without the owner being online. The node stores KeyPackages by the owner's
# 32-byte Ed25519 identity key and hands each one out exactly once, because an
# MLS KeyPackage's HPKE init key must not be used for two Welcomes.
@0xab01bd30b7b897fa;

interface AuthService {
  # Stores one KeyPackage for `identityKey`.
  #
  # identityKey: the owner's raw Ed25519 public key; exactly 32 bytes.
  # package:     the TLS-serialized MLS KeyPackage (RFC 9420 `KeyPackage`);
  #              not empty, at most the node's payload limit (see ping).
  # fingerprint: SHA-256 of `package` exactly as received, so the uploader can
  #              check that the node stored the bytes it sent.
  #
  # Answers only after the KeyPackage is durably stored. Errors: a key that is
  # not 32 bytes, an empty or oversize package.
  uploadKeyPackage @0 (identityKey :Data, package :Data) -> (fingerprint :Data);

  # Takes one KeyPackage of `identityKey` out of the directory.
  #
  # identityKey: the owner's raw Ed25519 public key; exactly 32 bytes.
  # package:     the oldest stored KeyPackage, which the node deletes in the
  #              same transaction, so concurrent callers never receive the same
  #              one. Empty (zero bytes) when the identity has none left or is
  #              unknown.
  fetchKeyPackage @1 (identityKey :Data) -> (package :Data);
}
