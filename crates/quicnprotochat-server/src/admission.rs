//! Who may hold a connection: caps per remote address, per client identity,
//! for anonymous connections and for strangers (a share of the node's
//! total), and QUIC address validation (Retry) once unvalidated handshakes
//! pile up.
//!
//! An "address" is an IPv4 address, or an IPv6 prefix (a /64 by default):
//! whoever has one IPv6 address usually has a whole /64 of them, so
//! counting full IPv6 addresses would cap nobody. An IPv4 address seen
//! through a dual-stack socket (`::ffff:a.b.c.d`) is that IPv4 address.
//!
//! A slot is a guard: the count goes down when it is dropped, however the
//! connection ends.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use quicnprotochat_core::IdentityKey;

/// The counters and their caps, shared by the accept loop and the workers.
#[derive(Debug)]
pub struct Admission {
    per_address: PerKey<IpAddr>,
    /// Connections per client identity, counted once the handshake shows it.
    per_identity: PerKey<IdentityKey>,
    /// Leading bits of an IPv6 address that name its "address".
    ipv6_prefix: u8,
    anonymous: AtomicUsize,
    max_anonymous: usize,
    /// Connections of strangers: anonymous, or identities the node held
    /// nothing for when they connected while strangers held their share.
    strangers: AtomicUsize,
    max_strangers: usize,
    handshaking: AtomicUsize,
    retry_above: usize,
}

/// What to do with a new connection attempt.
#[derive(Debug)]
pub enum Decision {
    /// Go on with the handshake, holding the address slot.
    Admit(AddressSlot),
    /// Ask the client to prove its address first (QUIC Retry): no state is
    /// kept until it comes back with the token.
    Retry,
    /// Its address holds as many connections as it may.
    Refuse,
}

impl Admission {
    /// Caps of `max_per_address` connections per remote address (an IPv6
    /// one counted as its prefix of `ipv6_prefix` bits) and
    /// `max_anonymous` anonymous ones; Retry once more than `retry_above`
    /// handshakes from unvalidated addresses are in progress; at most
    /// `max_strangers` connections of strangers (see [`Self::stranger`])
    /// and `max_per_identity` of one identity.
    pub fn new(
        max_per_address: usize,
        ipv6_prefix: u8,
        max_anonymous: usize,
        retry_above: usize,
        max_strangers: usize,
        max_per_identity: usize,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            per_address: PerKey::new(max_per_address),
            per_identity: PerKey::new(max_per_identity),
            ipv6_prefix: ipv6_prefix.min(128),
            anonymous: AtomicUsize::new(0),
            max_anonymous,
            strangers: AtomicUsize::new(0),
            max_strangers,
            handshaking: AtomicUsize::new(0),
            retry_above,
        })
    }

    /// Decides on an attempt from `address`, whose address QUIC has
    /// validated or not (a Retry token or a migration).
    pub fn admit(self: &Arc<Self>, address: IpAddr, validated: bool, may_retry: bool) -> Decision {
        if !validated && may_retry && self.handshaking.load(Ordering::Relaxed) >= self.retry_above {
            return Decision::Retry;
        }
        let address = self.counted_as(address);
        if !self.per_address.take(address) {
            return Decision::Refuse;
        }
        self.handshaking.fetch_add(1, Ordering::Relaxed);
        Decision::Admit(AddressSlot {
            admission: self.clone(),
            address,
            handshaking: true,
        })
    }

    /// What `address` counts as: itself for IPv4 (also when mapped into
    /// IPv6), its prefix for IPv6.
    pub fn counted_as(&self, address: IpAddr) -> IpAddr {
        match address.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.ipv6_prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
            v4 => v4,
        }
    }

    /// Takes a slot of `identity`, whose connection's handshake just
    /// proved it; `None` if it holds as many connections as it may.
    pub fn identity(self: &Arc<Self>, identity: IdentityKey) -> Option<IdentitySlot> {
        self.per_identity.take(identity).then(|| IdentitySlot {
            admission: self.clone(),
            identity,
        })
    }

    /// Takes an anonymous slot for a connection whose handshake ended
    /// without a client certificate; `None` if all are taken.
    pub fn anonymous(self: &Arc<Self>) -> Option<CountedSlot> {
        self.count(Counted::Anonymous)
    }

    /// Takes a stranger's slot; `None` if strangers hold their whole share.
    /// Every connection takes one while there is room (so knowing who is a
    /// member costs nothing until it matters); beyond, only identities the
    /// node already serves get in, without one: the rest of the node's total
    /// is theirs.
    pub fn stranger(self: &Arc<Self>) -> Option<CountedSlot> {
        self.count(Counted::Stranger)
    }

    fn count(self: &Arc<Self>, kind: Counted) -> Option<CountedSlot> {
        let (counter, max) = self.counter(kind);
        let taken = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < max).then_some(held + 1)
            })
            .is_ok();
        taken.then(|| CountedSlot {
            admission: self.clone(),
            kind,
        })
    }

    fn counter(&self, kind: Counted) -> (&AtomicUsize, usize) {
        match kind {
            Counted::Anonymous => (&self.anonymous, self.max_anonymous),
            Counted::Stranger => (&self.strangers, self.max_strangers),
        }
    }
}

/// What a [`CountedSlot`] counts.
#[derive(Debug, Clone, Copy)]
enum Counted {
    Anonymous,
    Stranger,
}

/// A connection counted against its address (and, until
/// [`AddressSlot::handshake_done`], as a handshake in progress).
#[derive(Debug)]
pub struct AddressSlot {
    admission: Arc<Admission>,
    address: IpAddr,
    handshaking: bool,
}

impl AddressSlot {
    /// The handshake ended (either way).
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.admission.handshaking.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        self.handshake_done();
        self.admission.per_address.give(self.address);
    }
}

/// A connection counted against its client identity until dropped.
#[derive(Debug)]
pub struct IdentitySlot {
    admission: Arc<Admission>,
    identity: IdentityKey,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        self.admission.per_identity.give(self.identity);
    }
}

/// Connections held per key (an address, an identity), up to a cap; a key
/// holding none is forgotten.
#[derive(Debug)]
struct PerKey<K> {
    held: Mutex<HashMap<K, usize>>,
    max: usize,
}

impl<K: Hash + Eq> PerKey<K> {
    fn new(max: usize) -> PerKey<K> {
        PerKey {
            held: Mutex::new(HashMap::new()),
            max,
        }
    }

    /// Counts one more for `key`, unless it holds its cap already.
    fn take(&self, key: K) -> bool {
        let mut held = self.lock();
        let count = held.entry(key).or_default();
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    fn give(&self, key: K) {
        let mut held = self.lock();
        if let Some(count) = held.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&key);
            }
        }
    }

    /// A poisoned lock only means a panic elsewhere mid-update of plain
    /// counters; they are still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An anonymous or a stranger's connection, counted until dropped.
#[derive(Debug)]
pub struct CountedSlot {
    admission: Arc<Admission>,
    kind: Counted,
}

impl Drop for CountedSlot {
    fn drop(&mut self) {
        self.admission.counter(self.kind).0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_it_back() {
        let admission = Admission::new(2, 64, 1, 100, usize::MAX, usize::MAX);
        let address: IpAddr = "192.0.2.1".parse().unwrap();
        let first = admission.admit(address, true, true);
        let second = admission.admit(address, true, true);
        assert!(matches!(admission.admit(address, true, true), Decision::Refuse));
        assert!(matches!(
            admission.admit("192.0.2.2".parse().unwrap(), true, true),
            Decision::Admit(_)
        ));
        drop(first);
        assert!(matches!(admission.admit(address, true, true), Decision::Admit(_)));
        drop(second);
    }

    #[test]
    fn unvalidated_handshakes_beyond_the_threshold_are_asked_to_retry() {
        let admission = Admission::new(100, 64, 1, 2, usize::MAX, usize::MAX);
        let address: IpAddr = "192.0.2.1".parse().unwrap();
        let mut slots: Vec<AddressSlot> = (0..2)
            .map(|_| match admission.admit(address, false, true) {
                Decision::Admit(slot) => slot,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(matches!(admission.admit(address, false, true), Decision::Retry));
        // A client back with its Retry token is validated and admitted.
        assert!(matches!(admission.admit(address, true, true), Decision::Admit(_)));
        for slot in &mut slots {
            slot.handshake_done();
        }
        assert!(matches!(
            admission.admit(address, false, true),
            Decision::Admit(_)
        ));
    }

    #[test]
    fn an_identity_holds_at_most_its_share_and_gets_it_back() {
        let admission = Admission::new(100, 64, 100, 100, 100, 2);
        let (alice, bob) = (IdentityKey::from_bytes([1; 32]), IdentityKey::from_bytes([2; 32]));
        let first = admission.identity(alice).unwrap();
        let _second = admission.identity(alice).unwrap();
        assert!(admission.identity(alice).is_none());
        assert!(admission.identity(bob).is_some(), "each identity has its own");
        drop(first);
        assert!(admission.identity(alice).is_some());
    }

    #[test]
    fn strangers_hold_at_most_their_share() {
        let admission = Admission::new(100, 64, 100, 100, 2, usize::MAX);
        let first = admission.stranger().unwrap();
        let _second = admission.stranger().unwrap();
        assert!(admission.stranger().is_none());
        drop(first);
        assert!(admission.stranger().is_some());
    }

    #[test]
    fn anonymous_connections_have_their_own_cap() {
        let admission = Admission::new(100, 64, 2, 100, usize::MAX, usize::MAX);
        let first = admission.anonymous().unwrap();
        let _second = admission.anonymous().unwrap();
        assert!(admission.anonymous().is_none());
        drop(first);
        assert!(admission.anonymous().is_some());
    }

    #[test]
    fn an_ipv6_prefix_counts_as_one_address_and_a_mapped_ipv4_as_itself() {
        let admission = Admission::new(2, 64, 1, 100, usize::MAX, usize::MAX);
        let admit = |text: &str| admission.admit(text.parse().unwrap(), true, true);
        // Two addresses of one /64 share its cap.
        let _a = admit("2001:db8:1:2::1");
        let _b = admit("2001:db8:1:2:ffff:ffff:ffff:ffff");
        assert!(matches!(admit("2001:db8:1:2::abcd"), Decision::Refuse));
        // The next /64 is another address.
        assert!(matches!(admit("2001:db8:1:3::1"), Decision::Admit(_)));
        // An IPv4 address through a dual-stack socket is that IPv4 address.
        let _c = admit("192.0.2.7");
        let _d = admit("::ffff:192.0.2.7");
        assert!(matches!(admit("192.0.2.7"), Decision::Refuse));
        // /128 counts every IPv6 address on its own; /0 all as one.
        let exact = Admission::new(1, 128, 1, 100, usize::MAX, usize::MAX);
        let _e = exact.admit("2001:db8::1".parse().unwrap(), true, true);
        assert!(matches!(
            exact.admit("2001:db8::2".parse().unwrap(), true, true),
            Decision::Admit(_)
        ));
        let all = Admission::new(1, 0, 1, 100, usize::MAX, usize::MAX);
        let _f = all.admit("2001:db8::1".parse().unwrap(), true, true);
        assert!(matches!(
            all.admit("2001:db9::2".parse().unwrap(), true, true),
            Decision::Refuse
        ));
    }
}
