//! Memory budgets: how many bytes of frames, answers and pushes one peer
//! (an identity, or an anonymous address) may make the node hold over all
//! its connections, and how many all peers together.
//!
//! Two accounts per peer, each drawing on a pool shared by the whole node:
//! - **calls**: every incoming frame from the moment its size is known (so
//!   a frame declaring megabytes and sending a kilobyte holds its budget,
//!   never its memory), and for a call, also the largest answer its method
//!   can give, until that answer has been written to QUIC. The reader of a
//!   session waits for this account before it reads a frame, which is the
//!   backpressure: a peer that stops reading its answers stops being read.
//! - **pushes**: the node's `deliver` calls to a subscriber, from the read
//!   of the messages until the subscriber answers. Kept apart from calls
//!   because a push is answered by a frame the reader must be free to read:
//!   if pushes could fill the calls account, a paused reader would wait for
//!   pushes that wait for the reader.
//!
//! Each account may hold up to its `floor` without drawing on the pool, so a
//! peer's small calls are served however full the pool is; beyond it, the
//! pool must have room. A single take larger than the account's limit is
//! granted when the account holds nothing (it could never pass otherwise).
//!
//! A peer's connections may be served by different RPC threads, so the
//! accounts are atomic, as the pools are.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// Bytes the whole node may hold for one kind of use, across connections.
#[derive(Debug)]
pub struct Pool {
    /// Accounts waiting for room are woken when any is given back.
    bytes: Counter,
}

impl Pool {
    /// A pool of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Pool> {
        Arc::new(Pool {
            bytes: Counter::new(limit),
        })
    }

    /// Bytes held now, by all connections.
    pub fn held(&self) -> usize {
        self.bytes.held()
    }

    /// The pool's size.
    pub fn limit(&self) -> usize {
        self.bytes.limit
    }

    /// Takes `bytes` if they fit (or the pool is empty); otherwise leaves
    /// `cx` to be woken when some are given back.
    fn poll_take(&self, bytes: usize, cx: &mut Context<'_>) -> Poll<()> {
        if bytes == 0 {
            return Poll::Ready(());
        }
        loop {
            let held = std::task::ready!(self.bytes.poll_room(bytes, cx));
            if self.bytes.commit(held, held + bytes) {
                return Poll::Ready(());
            }
        }
    }

    fn give(&self, bytes: usize) {
        if bytes != 0 {
            self.bytes.give(bytes);
        }
    }
}

/// One peer's share of one [`Pool`]: every connection of the peer draws on
/// it, from whichever RPC thread serves it.
#[derive(Debug)]
pub struct Account {
    bytes: Counter,
    floor: usize,
    pool: Arc<Pool>,
}

impl Account {
    /// An account of at most `limit` bytes, the first `floor` of them not
    /// drawn on `pool`.
    pub fn new(limit: usize, floor: usize, pool: Arc<Pool>) -> Arc<Account> {
        Arc::new(Account {
            bytes: Counter::new(limit),
            floor: floor.min(limit),
            pool,
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.bytes.held()
    }

    /// The account's limit.
    pub fn limit(&self) -> usize {
        self.bytes.limit
    }

    /// The part of `held` bytes drawn on the pool.
    fn above_floor(&self, held: usize) -> usize {
        held.saturating_sub(self.floor)
    }

    /// Takes `bytes` once the account and the pool have room; `Pending`
    /// (with `cx` to be woken) until then.
    pub fn poll_take(&self, bytes: usize, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let held = std::task::ready!(self.bytes.poll_room(bytes, cx));
            let after = held.saturating_add(bytes);
            // What lies above the floor comes from the pool.
            let from_pool = self.above_floor(after) - self.above_floor(held);
            std::task::ready!(self.pool.poll_take(from_pool, cx));
            if self.bytes.commit(held, after) {
                return Poll::Ready(());
            }
            // Another connection of the peer moved first: try again.
            self.pool.give(from_pool);
        }
    }

    /// Takes `bytes` once there is room.
    pub async fn take(self: &Arc<Self>, bytes: usize) -> Held {
        poll_fn(|cx| self.poll_take(bytes, cx)).await;
        Held {
            account: self.clone(),
            bytes,
        }
    }

    /// Gives `bytes` back (as taken earlier), to the pool first for what was
    /// drawn on it.
    pub fn give(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let before = self.bytes.give(bytes);
        let after = before.saturating_sub(bytes);
        self.pool.give(self.above_floor(before) - self.above_floor(after));
    }
}

/// Bytes held against a limit, and the tasks waiting for room.
#[derive(Debug)]
struct Counter {
    limit: usize,
    held: AtomicUsize,
    waiting: Waiting,
}

impl Counter {
    fn new(limit: usize) -> Counter {
        Counter {
            limit,
            held: AtomicUsize::new(0),
            waiting: Waiting::default(),
        }
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// What is held now, once `bytes` more fit (or nothing is held: a lone
    /// take bigger than the limit passes); until then `cx` waits for a give.
    fn poll_room(&self, bytes: usize, cx: &mut Context<'_>) -> Poll<usize> {
        let mut held = self.held();
        loop {
            if held == 0 || held.saturating_add(bytes) <= self.limit {
                return Poll::Ready(held);
            }
            // Registered before the re-check, so a give in between wakes it.
            self.waiting.push(cx.waker());
            let now = self.held();
            if now == held {
                return Poll::Pending;
            }
            held = now;
        }
    }

    /// Moves what is held from `held` to `after`, unless it changed since.
    fn commit(&self, held: usize, after: usize) -> bool {
        self.held
            .compare_exchange(held, after, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Gives `bytes` back and wakes who waits; what was held before.
    fn give(&self, bytes: usize) -> usize {
        let before = self.held.fetch_sub(bytes, Ordering::SeqCst);
        self.waiting.wake_all();
        before
    }
}

/// Tasks waiting for room. A give looks at a flag, not the lock, when
/// nobody waits: the common case, on every answer written. (All orderings
/// are sequentially consistent: a taker stores the flag then reads the
/// count, a giver writes the count then reads the flag, and one of them
/// must see the other's write.)
#[derive(Debug, Default)]
struct Waiting {
    any: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Waiting {
    fn push(&self, waker: &Waker) {
        let mut wakers = self.lock();
        wakers.push(waker.clone());
        self.any.store(true, Ordering::SeqCst);
    }

    fn wake_all(&self) {
        if !self.any.load(Ordering::SeqCst) {
            return;
        }
        let wakers = {
            let mut wakers = self.lock();
            self.any.store(false, Ordering::SeqCst);
            std::mem::take(&mut *wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// A panic while the lock was held left only a list of wakers.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waker>> {
        self.wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Bytes taken from an [`Account`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    account: Arc<Account>,
    bytes: usize,
}

impl Held {
    /// Gives back what is held beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.bytes {
            self.account.give(self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.account.give(self.bytes);
    }
}

/// What one peer may hold, over all its connections: its calls account
/// and its pushes account.
#[derive(Debug)]
pub struct PeerMemory {
    /// Incoming frames and the answers to calls.
    pub calls: Arc<Account>,
    /// Messages pushed to subscribers and not yet taken.
    pub pushes: Arc<Account>,
}

/// The node-wide pools and the per-connection limits drawn on them.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    /// Frames and answers, all connections together.
    pub calls: Arc<Pool>,
    /// Pushes, all connections together.
    pub pushes: Arc<Pool>,
    /// One peer's limit for frames and answers.
    pub peer_calls: usize,
    /// One peer's limit for pushes.
    pub peer_pushes: usize,
    /// What each account may hold without drawing on its pool.
    pub floor: usize,
}

impl MemoryBudget {
    /// The accounts of a peer new to the node.
    pub fn peer(&self) -> PeerMemory {
        PeerMemory {
            calls: Account::new(self.peer_calls, self.floor, self.calls.clone()),
            pushes: Account::new(self.peer_pushes, self.floor, self.pushes.clone()),
        }
    }
}

/// The largest answer each `NodeService` method can give, in bytes, which
/// a call holds in its peer's calls account from the moment it is
/// read until its answer has been written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerBounds {
    /// Outcomes, counts, pings, exceptions: a few hundred bytes. Small
    /// enough that a client's usual window of pipelined sends (32) stays
    /// within its floor, off the shared pool.
    pub small: usize,
    /// `fetch`, `fetchSince` and `fetchWait`: at most
    /// [`crate::wire::FETCH_ANSWER_BYTES`] and one more message.
    pub messages: usize,
    /// A KeyPackage, device lists, a group's state or a ratchet tree:
    /// bounded by what one frame could carry to the node. A group whose
    /// state grew larger (thousands of members) is answered all the same;
    /// only such an answer exceeds its bound.
    pub large: usize,
    /// `uploadKeyPackages`: a fingerprint and an outcome per package.
    pub uploads: usize,
}

impl AnswerBounds {
    /// The bounds for a node accepting payloads of `max_payload` bytes and
    /// frames of `max_frame` bytes.
    pub fn new(max_payload: usize, max_frame: usize) -> AnswerBounds {
        AnswerBounds {
            small: 1024,
            messages: crate::wire::FETCH_ANSWER_BYTES + max_payload + 4 * 1024,
            large: max_frame,
            uploads: 128 * 1024,
        }
    }

    /// The bound of method `method` of interface `interface`; calls to
    /// anything else (which are answered with an exception) are small.
    pub fn of(&self, interface: u64, method: u16) -> usize {
        use capnp::traits::HasTypeId;

        use crate::auth_capnp::auth_service;
        use crate::delivery_capnp::delivery_service;

        if interface == delivery_service::Client::TYPE_ID {
            match method {
                // fetch, fetchSince, fetchWait
                1 | 3 | 7 => self.messages,
                // fetchGroupInfo, fetchWelcomeTree
                9 | 10 => self.large,
                _ => self.small,
            }
        } else if interface == auth_service::Client::TYPE_ID {
            match method {
                // fetchKeyPackage, fetchDeviceLists
                1 | 5 => self.large,
                // uploadKeyPackages
                2 => self.uploads,
                _ => self.small,
            }
        } else {
            self.small
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::task::noop_waker;

    use super::*;

    fn take(account: &Account, bytes: usize) -> bool {
        let waker = noop_waker();
        account
            .poll_take(bytes, &mut Context::from_waker(&waker))
            .is_ready()
    }

    #[test]
    fn an_account_holds_its_floor_without_the_pool_and_the_rest_from_it() {
        let pool = Pool::new(100);
        let a = Account::new(1000, 50, pool.clone());
        assert!(take(&a, 40));
        assert_eq!(pool.held(), 0, "within the floor");
        assert!(take(&a, 30));
        assert_eq!(pool.held(), 20, "what lies above the floor");
        a.give(30);
        assert_eq!((a.held(), pool.held()), (40, 0));
        a.give(40);
        assert_eq!((a.held(), pool.held()), (0, 0));
    }

    #[test]
    fn a_full_pool_holds_back_every_account_beyond_its_floor() {
        let pool = Pool::new(100);
        let greedy = Account::new(1000, 0, pool.clone());
        let member = Account::new(1000, 64, pool.clone());
        assert!(take(&greedy, 100));
        assert!(!take(&greedy, 1), "the pool is full");
        assert!(take(&member, 64), "a floor is always there");
        assert!(!take(&member, 1));
        greedy.give(50);
        assert!(take(&member, 50));
        assert_eq!(pool.held(), 100);
    }

    #[test]
    fn an_account_stops_at_its_limit_but_a_lone_take_bigger_than_it_passes() {
        let pool = Pool::new(10_000);
        let a = Account::new(100, 0, pool.clone());
        assert!(take(&a, 80));
        assert!(!take(&a, 30));
        a.give(80);
        assert!(take(&a, 500), "alone, a take bigger than the limit passes");
        assert!(!take(&a, 1));
        a.give(500);
        assert_eq!((a.held(), pool.held()), (0, 0));
    }

    #[test]
    fn held_bytes_go_back_when_dropped_or_shrunk() {
        let pool = Pool::new(1000);
        let a = Account::new(1000, 0, pool.clone());
        let mut held = futures::executor::block_on(a.take(300));
        held.shrink_to(100);
        assert_eq!((a.held(), pool.held()), (100, 100));
        drop(held);
        assert_eq!((a.held(), pool.held()), (0, 0));
    }
}
