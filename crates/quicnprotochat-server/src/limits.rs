//! Per-caller rate limits: token buckets (governor) keyed by the caller's
//! identity, or by its IP address when it is anonymous.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use quicnprotochat_core::IdentityKey;

/// Who is calling, for rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    /// An authenticated connection.
    Identity(IdentityKey),
    /// An anonymous connection, by its address.
    Address(IpAddr),
}

/// The node's rate limiters; `None` where a limit is switched off.
#[derive(Debug)]
pub struct RateLimits {
    enqueue: Option<Bucket>,
    key_package_fetch: Option<Bucket>,
    ping: Option<Bucket>,
}

/// One limiter and its burst size.
#[derive(Debug)]
struct Bucket {
    limiter: DefaultKeyedRateLimiter<Caller>,
    burst: NonZeroU32,
}

impl RateLimits {
    /// Limits of `enqueue_per_second` queued messages, `fetch_per_second`
    /// KeyPackage fetches and `ping_per_second` pings per caller (0:
    /// unlimited), each allowing bursts of twice the rate.
    pub fn new(enqueue_per_second: u32, fetch_per_second: u32, ping_per_second: u32) -> RateLimits {
        RateLimits {
            enqueue: limiter(enqueue_per_second),
            key_package_fetch: limiter(fetch_per_second),
            ping: limiter(ping_per_second),
        }
    }

    /// Takes a token for one ping; on refusal, how long to wait.
    pub fn check_ping(&self, caller: Caller) -> Result<(), Duration> {
        check(self.ping.as_ref(), caller, 1)
    }

    /// Takes `messages` tokens for queuing messages; on refusal, how long to
    /// wait.
    pub fn check_enqueue(&self, caller: Caller, messages: usize) -> Result<(), Duration> {
        check(self.enqueue.as_ref(), caller, messages)
    }

    /// Takes a token for one KeyPackage fetch; on refusal, how long to wait.
    pub fn check_key_package_fetch(&self, caller: Caller) -> Result<(), Duration> {
        check(self.key_package_fetch.as_ref(), caller, 1)
    }

    /// Forgets callers whose buckets are full again, bounding memory.
    pub fn shrink(&self) {
        for limiter in [&self.enqueue, &self.key_package_fetch, &self.ping]
            .into_iter()
            .flatten()
        {
            limiter.limiter.retain_recent();
            limiter.limiter.shrink_to_fit();
        }
    }
}

fn limiter(per_second: u32) -> Option<Bucket> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
    Some(Bucket {
        limiter: DefaultKeyedRateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
        burst,
    })
}

fn check(bucket: Option<&Bucket>, caller: Caller, cost: usize) -> Result<(), Duration> {
    let Some(Bucket { limiter, burst }) = bucket else {
        return Ok(());
    };
    let Some(cost) = NonZeroU32::new(u32::try_from(cost).unwrap_or(u32::MAX)) else {
        return Ok(());
    };
    let wait = |not_until: governor::NotUntil<_>| not_until.wait_time_from(DefaultClock::default().now());
    match limiter.check_key_n(&caller, cost) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(wait(not_until)),
        // More than a whole burst at once can never pass as asked; charge a
        // full burst instead, so a large group send waits for a full bucket
        // but is not refused forever.
        Err(_) => match limiter.check_key_n(&caller, *burst) {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(not_until)) => Err(wait(not_until)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_beyond_its_burst_is_told_how_long_to_wait() {
        let limits = RateLimits::new(10, 0, 0);
        let caller = Caller::Identity(IdentityKey::from_bytes([1; 32]));
        assert!(limits.check_enqueue(caller, 20).is_ok());
        let wait = limits.check_enqueue(caller, 1).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        // Others have their own bucket; fetches are unlimited here.
        assert!(
            limits
                .check_enqueue(Caller::Identity(IdentityKey::from_bytes([2; 32])), 1)
                .is_ok()
        );
        assert!(limits.check_key_package_fetch(caller).is_ok());
    }
}
