# Authentication Service: a directory of MLS KeyPackages.
#
# A KeyPackage (RFC 9420, section 10) lets anyone add its owner to an MLS group
# without the owner being online. The node stores KeyPackages by the owner's
# 32-byte Ed25519 identity key and hands each one out exactly once, because an
# MLS KeyPackage's HPKE init key must not be used for two Welcomes.
@0xab01bd30b7b897fa;

using Delivery = import "delivery.capnp";

# What `fetchKeyPackage` found. See delivery.capnp for how outcomes and
# exceptions differ.
struct FetchedKeyPackage {
  union {
    # A KeyPackage of the identity: the oldest unexpired ordinary one, which
    # the node deleted in the same transaction (so concurrent callers never
    # receive the same one); when none is left, the newest unexpired
    # last-resort one, which is kept.
    package @0 :Data;

    # The identity has no unexpired KeyPackage (or is unknown): ask its
    # owner to upload more.
    none @1 :Void;

    # Over the caller's fetch rate (per identity, or per address when
    # anonymous): wait, then ask again.
    rateLimited @2 :Delivery.RateLimited;
  }
}

# What became of an upload (protocol 4). Anything but `stored` stored
# nothing.
struct UploadOutcome {
  union {
    # Every KeyPackage is durably stored; `fingerprint(s)` are filled.
    stored @0 :Void;

    # Over the uploader's send budget (each KeyPackage counts as one queued
    # message, its bytes as payload bytes): wait, then upload again.
    rateLimited @1 :Delivery.RateLimited;

    # The identity would hold more unexpired KeyPackages of one
    # ciphersuite than the node keeps for one identity and suite: let some
    # be used (or expire) first.
    tooMany @2 :TooManyKeyPackages;
  }
}

# An identity's KeyPackage stock of one ciphersuite is full (the first full
# suite of the upload, protocol 6).
struct TooManyKeyPackages {
  # Unexpired KeyPackages of that suite the identity holds now.
  stored @0 :UInt32;

  # The node's limit per identity and suite (`--max-key-packages`).
  max @1 :UInt32;
}

# A user's device list (protocol 5): which device keys belong to one user
# key, signed by that user key. A person is known to peers by the user key;
# each of their devices has its own Ed25519 device key, which is its TLS
# identity, the owner of its queue and KeyPackages, and the signature key of
# its MLS leaves. To reach a user, fetch its list and one KeyPackage per
# device. A user without a stored list has exactly one device: the user key
# itself (every client before protocol 5 works that way).
#
# A leaf's basic credential names its user: either 32 bytes, the key being
# both user and device (equal to the leaf signature key), or 64 bytes, the
# user key followed by the device key (equal to the leaf signature key).
# Clients accept a 64-byte leaf only if the user's current list names the
# device; the node cannot forge lists, so it cannot add a device to anyone.
struct SignedDeviceList {
  # The user key; exactly 32 bytes.
  userKey @0 :Data;

  # Each new list of a user has a higher version than every earlier one.
  version @1 :UInt64;

  # The device keys, 32 bytes each, at least 1 and at most 64, distinct and
  # in ascending byte order.
  devices @2 :List(Data);

  # Ed25519 signature (64 bytes) by `userKey` over, in this order: the ASCII
  # label "quicnprotochat device list v1", `userKey`, `version` as a
  # big-endian u64, the number of devices as a big-endian u16, and the
  # device keys in list order. Verified strictly (no malleable signatures).
  signature @3 :Data;
}

# What became of `uploadDeviceList` (protocol 5). Anything but `stored`
# stored nothing.
struct DeviceListOutcome {
  union {
    # The list is durably stored and is what fetchDeviceLists serves; also
    # the answer when exactly this list was already stored (a safe retry).
    stored @0 :Void;

    # The node holds a list of this user with this or a higher version:
    # lists never go back (a removed device stays removed). `current` is
    # the stored version; sign a list with a higher one.
    stale @1 :StaleDeviceList;

    # `signature` is not `userKey`'s signature over this list.
    badSignature @2 :Void;

    # The caller may not replace this user's list: only a device named in
    # the stored list may (or, for a user's first list, a device named in
    # the new list or the user key itself), so a device that was removed
    # cannot put itself back through this node.
    notADevice @3 :Void;

    # Over the caller's send budget: wait, then upload again.
    rateLimited @4 :Delivery.RateLimited;

    # The version is more than `maxStep` above the stored one (for a
    # user's first list: above `maxStep`), protocol 7. Versions only move
    # forward; a bounded step keeps anyone from exhausting them (a list at
    # 2^64-1 could never be replaced). Sign a list with a version within
    # the step.
    tooFar @5 :DeviceListTooFar;

    # The list names a device an earlier list of this user dropped
    # (protocol 7): removed devices stay removed, whoever uploads the list.
    # Every device holds the user key, so a removed one could otherwise
    # sign itself back in. Link the hardware anew (a new link code makes a
    # new device key).
    removedDevice @6 :Void;
  }
}

# A device list upload whose version jumps too far ahead.
struct DeviceListTooFar {
  # The version the node holds (0: none).
  current @0 :UInt64;

  # The most a new version may exceed it by.
  maxStep @1 :UInt64;
}

# A device list upload that would not move the user's list forward.
struct StaleDeviceList {
  # The version the node holds.
  current @0 :UInt64;
}

interface AuthService {
  # Stores one KeyPackage for `identityKey`.
  #
  # identityKey: the owner's raw Ed25519 public key; exactly 32 bytes. Only a
  #              connection authenticated as this identity may upload for it.
  # package:     the TLS-serialized MLS KeyPackage (RFC 9420 `KeyPackage`),
  #              bare or wrapped in an MLSMessage (wire format
  #              mls_key_package, as some libraries produce it; it is
  #              stored and served bare);
  #              not empty, at most the node's payload limit (see ping). The
  #              node validates it: signature, protocol version, ciphersuite
  #              MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519 (0x0001) or,
  #              from protocol 6, MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519
  #              (0x004F; its ML-KEM-768 + X25519 init key alone is 1,216
  #              bytes), lifetime, and a
  #              basic credential naming the leaf signature key, which must
  #              be `identityKey` (the device key): 32 bytes, the key itself,
  #              or 64 bytes, the user key and then the device key (see
  #              SignedDeviceList), a lifetime of at most the node's maximum
  #              (90 days by default, RFC 9420 section 7.2 asks for one), and
  #              extensions (leaf and KeyPackage, each) of at most 1 KiB. A
  #              KeyPackage with the `last_resort` extension (type 0x000A,
  #              from the MLS extensions draft) is served only when no other
  #              is left, and is kept.
  # fingerprint: SHA-256 of `package` exactly as received, so the uploader can
  #              check that the node stored the bytes it sent; empty unless
  #              `outcome` is `stored`.
  # outcome:     `stored`, or why nothing was (protocol 4).
  #
  # Answers only after the KeyPackage is durably stored. An invalid package
  # is a `failed` exception saying why.
  uploadKeyPackage @0 (identityKey :Data, package :Data) -> (fingerprint :Data, outcome :UploadOutcome);

  # Takes one KeyPackage of `identityKey` out of the directory.
  #
  # identityKey: the owner's raw Ed25519 public key; exactly 32 bytes.
  # outcome:     the KeyPackage, `none`, or `rateLimited`.
  #
  # Anyone may call this, also anonymously: it is how strangers invite each
  # other. Besides each caller's fetch rate, each identity's ordinary
  # KeyPackages of each suite are handed out at a limited rate whoever asks
  # (a few per minute by default): beyond it the caller gets the last-resort
  # one of that suite, so nobody can drain an identity's stock in a burst
  # and its owner stays reachable.
  #
  # ciphersuite: the MLS ciphersuite wanted (protocol 6): 0x0001
  #              (MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519, the default,
  #              what every earlier client gets) or 0x004F
  #              (MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519, provisional
  #              code point). Only KeyPackages of that suite are served, and
  #              `none` means none of that suite. Any other value is a
  #              `failed` exception naming the suites the node knows.
  fetchKeyPackage @1 (identityKey :Data, ciphersuite :UInt16 = 0x0001) -> (outcome :FetchedKeyPackage);

  # Stores several KeyPackages of `identityKey` at once, all or none; each
  # is checked as in uploadKeyPackage. `fingerprints[i]` is the SHA-256 of
  # `packages[i]` (empty unless `outcome` is `stored`).
  uploadKeyPackages @2 (identityKey :Data, packages :List(Data))
      -> (fingerprints :List(Data), outcome :UploadOutcome);

  # How many unexpired KeyPackages of `identityKey` are waiting to be served,
  # not counting last-resort ones, and whether an unexpired last-resort one
  # is stored. Only the owner may ask. Clients upload more when running low.
  #
  # ciphersuite: which suite's KeyPackages to count (protocol 6), as in
  #              fetchKeyPackage; defaults to 0x0001.
  keyPackageCount @3 (identityKey :Data, ciphersuite :UInt16 = 0x0001) -> (count :UInt32, hasLastResort :Bool);

  # Stores a user's device list (protocol 5); see SignedDeviceList and
  # DeviceListOutcome. The connection must be authenticated (as a device of
  # the user, see `notADevice`). A malformed list (wrong key or signature
  # length, no device, more than 64, not ascending and distinct) is a
  # `failed` exception saying why. Answers only once the list is durably
  # stored.
  uploadDeviceList @4 (list :SignedDeviceList) -> (outcome :DeviceListOutcome);

  # The stored device lists of `userKeys` (each 32 bytes, at most 256 per
  # call), in the order asked, leaving out users without a list (a user
  # without a list has one device: the user key). Anyone may call this,
  # also anonymously; each call counts as one fetch against the caller's
  # fetch rate, and over it the call raises an `overloaded` exception.
  # Clients verify every signature themselves and remember the highest
  # version they saw of each user, so an old or forged list is detected.
  fetchDeviceLists @5 (userKeys :List(Data)) -> (lists :List(SignedDeviceList));
}
