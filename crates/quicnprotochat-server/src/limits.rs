//! Per-caller limits: the send budget (queued messages and payload bytes
//! per second, our own GCRA) and token buckets for pings and KeyPackage
//! fetches (governor), keyed by the caller's identity, or by its IP address
//! when it is anonymous.
//!
//! The send budget is not a governor bucket because it needs what governor
//! does not offer: two costs charged together or not at all (messages and
//! bytes), and a group change bigger than the burst (a Commit to a big
//! group, which cannot be split) that passes once the budget is full and
//! then leaves its sender in debt for exactly its cost, so no call shape
//! gets more than the rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use quicnprotochat_core::{IdentityKey, Suite};

/// Who is calling, for rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    /// An authenticated connection.
    Identity(IdentityKey),
    /// An anonymous connection, by its address.
    Address(IpAddr),
}

/// What a call costs against the send budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Messages it queues: recipients, summed over envelopes (a KeyPackage
    /// uploaded counts as one).
    pub messages: u64,
    /// Payload bytes it stores (a payload queued for many once).
    pub bytes: u64,
}

/// Why the send budget refused a call; it was not charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetRefusal {
    /// Over the budget: it can pass after this wait.
    Wait(Duration),
    /// Bigger than the burst: it can never pass as it is.
    TooLarge {
        /// The burst of messages.
        max_messages: u64,
        /// The burst of bytes.
        max_bytes: u64,
    },
}

/// Over a rate: the call can pass after `retry_after`. The only refusal of
/// an indivisible charge, of a ping and of a KeyPackage fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// How long until the call would pass.
    pub retry_after: Duration,
}

/// Why an upload of KeyPackages was refused before they were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadRefusal {
    /// Over the identity's upload rate.
    Wait(Wait),
    /// More KeyPackages than one upload may ever carry (the burst).
    OverBurst {
        /// The most one upload may carry.
        burst: u32,
    },
}

/// The node's rate limits; `None` where a limit is switched off.
#[derive(Debug)]
pub struct RateLimits {
    sends: SendBudget,
    key_package_fetch: Option<Bucket>,
    ping: Option<Bucket>,
    /// Ordinary KeyPackages handed out per target identity and suite,
    /// whoever asks.
    key_package_serve: Option<DefaultKeyedRateLimiter<(IdentityKey, Suite)>>,
    /// KeyPackages uploaded per identity.
    key_package_upload: Option<(DefaultKeyedRateLimiter<IdentityKey>, NonZeroU32)>,
}

/// One per-caller token bucket.
#[derive(Debug)]
struct Bucket {
    limiter: DefaultKeyedRateLimiter<Caller>,
}

impl RateLimits {
    /// Limits of `messages_per_second` queued messages and
    /// `bytes_per_second` payload bytes per caller (bursts of twice the
    /// rate, and never less than `min_byte_burst`, the largest call one
    /// payload makes), `fetch_per_second` KeyPackage fetches and
    /// `ping_per_second` pings per caller (bursts of twice the rate), and
    /// `serve_per_minute` ordinary KeyPackages per target identity and
    /// ciphersuite and
    /// `uploads_per_minute` KeyPackages uploaded per identity (bursts of the
    /// same); 0: unlimited.
    pub fn new(
        messages_per_second: u32,
        bytes_per_second: u64,
        min_byte_burst: u64,
        fetch_per_second: u32,
        ping_per_second: u32,
        serve_per_minute: u32,
        uploads_per_minute: u32,
    ) -> RateLimits {
        RateLimits {
            sends: SendBudget::new(
                Gcra::new(u64::from(messages_per_second), 2 * u64::from(messages_per_second)),
                Gcra::new(bytes_per_second, (2 * bytes_per_second).max(min_byte_burst)),
            ),
            key_package_fetch: limiter(fetch_per_second),
            ping: limiter(ping_per_second),
            key_package_serve: NonZeroU32::new(serve_per_minute)
                .map(|rate| DefaultKeyedRateLimiter::dashmap(Quota::per_minute(rate))),
            key_package_upload: NonZeroU32::new(uploads_per_minute)
                .map(|rate| (DefaultKeyedRateLimiter::dashmap(Quota::per_minute(rate)), rate)),
        }
    }

    /// Takes `count` tokens for uploading KeyPackages of `owner` (before
    /// they are validated, which costs the node CPU).
    pub fn check_key_package_upload(&self, owner: &IdentityKey, count: u32) -> Result<(), UploadRefusal> {
        let Some((limiter, burst)) = &self.key_package_upload else {
            return Ok(());
        };
        let Some(count) = NonZeroU32::new(count) else {
            return Ok(());
        };
        match limiter.check_key_n(owner, count) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(UploadRefusal::Wait(Wait {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })),
            Err(_) => Err(UploadRefusal::OverBurst { burst: burst.get() }),
        }
    }

    /// Whether an ordinary KeyPackage of `target` in `suite` may be handed
    /// out now; if not, only its last-resort one of that suite is. Each
    /// suite's stock has its own rate: a burst of invitations to groups of
    /// one suite leaves the other's protection against draining whole.
    pub fn may_serve_ordinary_key_package(&self, target: &IdentityKey, suite: Suite) -> bool {
        self.key_package_serve
            .as_ref()
            .is_none_or(|limiter| limiter.check_key(&(*target, suite)).is_ok())
    }

    /// Takes a token for one ping.
    pub fn check_ping(&self, caller: Caller) -> Result<(), Wait> {
        check(self.ping.as_ref(), caller)
    }

    /// Charges a call that queues messages to the caller's send budget. A
    /// call bigger than the burst is refused as [`BudgetRefusal::TooLarge`]:
    /// the sender can split it.
    pub fn check_send(&self, caller: Caller, cost: Cost) -> Result<(), BudgetRefusal> {
        self.sends.check(caller, cost, false, Instant::now())
    }

    /// Charges a call that cannot be split (a group change, a client's
    /// batch of KeyPackages, a device list) to the caller's send budget.
    /// Bigger than the burst, it passes when the budget is full and leaves
    /// the caller in debt for the rest, so the only refusal is a wait.
    pub fn charge_indivisible(&self, caller: Caller, cost: Cost) -> Result<(), Wait> {
        match self.sends.check(caller, cost, true, Instant::now()) {
            Ok(()) => Ok(()),
            Err(BudgetRefusal::Wait(retry_after)) => Err(Wait { retry_after }),
            // `SendBudget::check` refuses as too large only divisible costs.
            Err(BudgetRefusal::TooLarge { .. }) => Err(Wait {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Takes a token for one KeyPackage fetch.
    pub fn check_key_package_fetch(&self, caller: Caller) -> Result<(), Wait> {
        check(self.key_package_fetch.as_ref(), caller)
    }

    /// Forgets callers whose budgets and buckets are full again, bounding
    /// memory.
    pub fn shrink(&self) {
        self.sends.shrink(Instant::now());
        for limiter in [&self.key_package_fetch, &self.ping].into_iter().flatten() {
            limiter.limiter.retain_recent();
            limiter.limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.key_package_serve {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some((limiter, _)) = &self.key_package_upload {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

fn limiter(per_second: u32) -> Option<Bucket> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
    Some(Bucket {
        limiter: DefaultKeyedRateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
    })
}

fn check(bucket: Option<&Bucket>, caller: Caller) -> Result<(), Wait> {
    let Some(Bucket { limiter }) = bucket else {
        return Ok(());
    };
    limiter.check_key(&caller).map_err(|not_until| Wait {
        retry_after: not_until.wait_time_from(DefaultClock::default().now()),
    })
}

/// One dimension of the send budget: the generic cell rate algorithm. A
/// caller's state is its theoretical arrival time (TAT): when its budget
/// will be full again. A call of cost `c` at `now` moves the TAT to
/// `max(TAT, now) + c·T` and passes if that is at most `now + burst·T`.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Time one unit costs; `None`: unlimited.
    per_unit: Option<Duration>,
    burst: u64,
}

impl Gcra {
    fn new(per_second: u64, burst: u64) -> Gcra {
        Gcra {
            per_unit: (per_second > 0).then(|| Duration::from_secs_f64(1.0 / per_second as f64)),
            burst,
        }
    }

    /// The TAT after charging `cost` at `now` from `tat`, or how long to
    /// wait. `indivisible` lets a cost above the burst pass when the budget
    /// is full.
    fn charge(
        &self,
        tat: Instant,
        cost: u64,
        indivisible: bool,
        now: Instant,
    ) -> Result<Instant, BudgetRefusal> {
        let Some(per_unit) = self.per_unit else {
            return Ok(tat);
        };
        let start = tat.max(now);
        let after = start + per_unit.saturating_mul(u32::try_from(cost).unwrap_or(u32::MAX));
        if cost > self.burst && indivisible {
            return if tat <= now {
                Ok(after)
            } else {
                Err(BudgetRefusal::Wait(tat - now))
            };
        }
        let limit = now + per_unit.saturating_mul(u32::try_from(self.burst).unwrap_or(u32::MAX));
        if after <= limit {
            Ok(after)
        } else {
            Err(BudgetRefusal::Wait(after - limit))
        }
    }

    fn too_large(&self, cost: u64) -> bool {
        self.per_unit.is_some() && cost > self.burst
    }
}

/// Messages and bytes per caller, charged together.
#[derive(Debug)]
struct SendBudget {
    messages: Gcra,
    bytes: Gcra,
    /// Each caller's TATs (messages, bytes); a caller absent is full.
    callers: Mutex<HashMap<Caller, (Instant, Instant)>>,
}

impl SendBudget {
    fn new(messages: Gcra, bytes: Gcra) -> SendBudget {
        SendBudget {
            messages,
            bytes,
            callers: Mutex::new(HashMap::new()),
        }
    }

    fn check(
        &self,
        caller: Caller,
        cost: Cost,
        indivisible: bool,
        now: Instant,
    ) -> Result<(), BudgetRefusal> {
        if !indivisible && (self.messages.too_large(cost.messages) || self.bytes.too_large(cost.bytes)) {
            return Err(BudgetRefusal::TooLarge {
                max_messages: self.messages.burst,
                max_bytes: self.bytes.burst,
            });
        }
        if self.messages.per_unit.is_none() && self.bytes.per_unit.is_none() {
            return Ok(());
        }
        // A poisoned lock only means another thread panicked mid-update of
        // plain timestamps; the map is still usable.
        let mut callers = self
            .callers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (messages, bytes) = callers.get(&caller).copied().unwrap_or((now, now));
        let charged = (
            self.messages.charge(messages, cost.messages, indivisible, now),
            self.bytes.charge(bytes, cost.bytes, indivisible, now),
        );
        match charged {
            (Ok(messages), Ok(bytes)) => {
                callers.insert(caller, (messages, bytes));
                Ok(())
            }
            (Err(BudgetRefusal::Wait(a)), Err(BudgetRefusal::Wait(b))) => Err(BudgetRefusal::Wait(a.max(b))),
            (Err(refusal), _) | (_, Err(refusal)) => Err(refusal),
        }
    }

    fn shrink(&self, now: Instant) {
        let mut callers = self
            .callers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        callers.retain(|_, (messages, bytes)| *messages > now || *bytes > now);
        callers.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(byte: u8) -> Caller {
        Caller::Identity(IdentityKey::from_bytes([byte; 32]))
    }

    fn messages(n: u64) -> Cost {
        Cost {
            messages: n,
            bytes: n,
        }
    }

    #[test]
    fn a_caller_beyond_its_burst_is_told_how_long_to_wait() {
        let limits = RateLimits::new(10, 0, 0, 0, 0, 0, 0);
        assert!(limits.check_send(caller(1), messages(20)).is_ok());
        let Err(BudgetRefusal::Wait(wait)) = limits.check_send(caller(1), messages(1)) else {
            panic!("over the burst");
        };
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Others have their own budget; fetches are unlimited here.
        assert!(limits.check_send(caller(2), messages(1)).is_ok());
        assert!(limits.check_key_package_fetch(caller(1)).is_ok());
    }

    #[test]
    fn ordinary_key_packages_of_one_identity_and_suite_are_served_at_their_own_rate() {
        let limits = RateLimits::new(0, 0, 0, 0, 0, 3, 0);
        let target = IdentityKey::from_bytes([7; 32]);
        for _ in 0..3 {
            assert!(limits.may_serve_ordinary_key_package(&target, Suite::MlKem768X25519));
        }
        assert!(!limits.may_serve_ordinary_key_package(&target, Suite::MlKem768X25519));
        // The identity's other suite and other identities have their own.
        assert!(limits.may_serve_ordinary_key_package(&target, Suite::X25519));
        assert!(
            limits.may_serve_ordinary_key_package(&IdentityKey::from_bytes([8; 32]), Suite::MlKem768X25519)
        );
    }

    #[test]
    fn a_call_bigger_than_the_burst_is_refused_whole_and_charged_nothing() {
        let limits = RateLimits::new(10, 1000, 0, 0, 0, 0, 0);
        assert_eq!(
            limits.check_send(caller(1), messages(21)),
            Err(BudgetRefusal::TooLarge {
                max_messages: 20,
                max_bytes: 2000
            })
        );
        assert_eq!(
            limits.check_send(
                caller(1),
                Cost {
                    messages: 1,
                    bytes: 2001
                }
            ),
            Err(BudgetRefusal::TooLarge {
                max_messages: 20,
                max_bytes: 2000
            })
        );
        // Nothing was charged: the whole burst is still there.
        assert!(limits.check_send(caller(1), messages(20)).is_ok());
    }

    #[test]
    fn an_indivisible_change_above_the_burst_passes_once_full_and_leaves_a_debt() {
        let budget = SendBudget::new(Gcra::new(1000, 2000), Gcra::new(0, 0));
        let start = Instant::now();
        let cost = Cost {
            messages: 10_000,
            bytes: 0,
        };
        assert_eq!(budget.check(caller(1), cost, true, start), Ok(()));
        // In debt for 8,000 messages at 1,000/s: a message passes once the
        // debt is below the burst (8 s later), and another change above the
        // burst only when the budget is full again (10 s later).
        let later = start + Duration::from_secs(7);
        assert_eq!(
            budget.check(caller(1), messages(1), false, later),
            Err(BudgetRefusal::Wait(Duration::from_millis(1001)))
        );
        assert_eq!(
            budget.check(caller(1), cost, true, later),
            Err(BudgetRefusal::Wait(Duration::from_secs(3)))
        );
        let repaid = start + Duration::from_secs(10);
        assert_eq!(budget.check(caller(1), messages(2000), false, repaid), Ok(()));
    }

    #[test]
    fn the_rate_holds_whatever_the_call_shape() {
        // 300 calls of 100 messages as fast as possible against 1,000/s:
        // what passes in 10 s of simulated time is the burst plus the rate.
        let budget = SendBudget::new(Gcra::new(1000, 2000), Gcra::new(0, 0));
        let start = Instant::now();
        let mut passed = 0;
        for step in 0..10_000u64 {
            let now = start + Duration::from_millis(step);
            if budget.check(caller(1), messages(100), false, now).is_ok() {
                passed += 100;
            }
        }
        assert!((11_900..=12_100).contains(&passed), "{passed}");
    }
}
