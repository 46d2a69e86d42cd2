//! Cheap checks that run before expensive work: failed authentications
//! counted per client address, failed logins per username, and the gate
//! in front of argon2. Every table here is a bounded cache, so an attacker
//! choosing keys (addresses, usernames) cannot grow memory.
//!
//! Failed logins are counted three ways, in fixed windows that start at a
//! key's first failure:
//! - per client address (any username, and unknown tokens too): one
//!   address's guesses are bounded whatever it aims at;
//! - per (username, address): one address may fail a username only a few
//!   times per window; this lockout locks out only that address;
//! - per username from any address: a crowd of addresses (a botnet) gets a
//!   bounded number of guesses at one username. While this one is full,
//!   addresses from which that username logged in successfully before keep
//!   logging in, so attackers cannot lock the real user out of the places
//!   they use; a new place waits for the window to end.

use super::auth::sha256_hex;
use moka::sync::Cache;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Keys each failure table remembers at most (least recently used go
/// first when full).
pub const STRIKE_KEYS_MAX: u64 = 100_000;
/// (username, address) pairs remembered as places a user logged in from.
pub const KNOWN_PLACES_MAX: u64 = 100_000;
/// How long a successful login's address is remembered for its username.
pub const KNOWN_PLACE_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// How many times more failures a username takes from all addresses
/// together than from one.
pub const USERNAME_FAILURES_PER_PAIR: u32 = 20;
/// Suspect logins (see `FailureLimits::suspect_logins_per_second`) allowed
/// at once above their rate, in seconds of that rate.
pub const SUSPECT_LOGINS_BURST_SECONDS: u32 = 2;

/// Failures per key in fixed windows starting at each key's first failure.
#[derive(Clone)]
pub struct Strikes<K: Hash + Eq + Send + Sync + 'static> {
    windows: Cache<K, Arc<Window>>,
    failures_max: u32,
    window: Duration,
}

/// One key's window: when it began and the failures in it.
pub struct Window {
    began: Instant,
    failures: AtomicU32,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Strikes<K> {
    /// At most `failures_max` failures per key per `window`.
    pub fn new(failures_max: u32, window: Duration) -> Strikes<K> {
        Strikes {
            windows: Cache::builder()
                .max_capacity(STRIKE_KEYS_MAX)
                .time_to_live(window)
                .build(),
            failures_max: failures_max.max(1),
            window,
        }
    }

    /// How long until `key` may try again, if it spent its failures.
    pub fn blocked(&self, key: &K) -> Option<Duration> {
        let window = self.windows.get(key)?;
        let left = self.window.checked_sub(window.began.elapsed())?;
        (window.failures.load(Ordering::Relaxed) >= self.failures_max).then_some(left)
    }

    /// Counts a failure for `key`.
    pub fn strike(&self, key: K) {
        let window = self.windows.get_with(key, || {
            Arc::new(Window {
                began: Instant::now(),
                failures: AtomicU32::new(0),
            })
        });
        window.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Failures counted for `key` in its current window.
    pub fn failures(&self, key: &K) -> u32 {
        self.windows
            .get(key)
            .filter(|window| window.began.elapsed() < self.window)
            .map_or(0, |window| window.failures.load(Ordering::Relaxed))
    }

    /// Forgets `key`'s failures.
    pub fn forgive(&self, key: &K) {
        self.windows.invalidate(key);
    }
}

/// The limits on failures, from `ledger serve`'s flags.
#[derive(Debug, Clone, Copy)]
pub struct FailureLimits {
    /// Failed authentications per client address per window.
    pub per_address: u32,
    /// Its window.
    pub address_window: Duration,
    /// Failed logins per (username, address) per lockout.
    pub per_user_address: u32,
    /// The lockout window of usernames.
    pub lockout: Duration,
    /// Logins per second, all addresses together, from addresses that
    /// failed lately (each costs a hash): a crowd of guessing addresses
    /// gets this much of argon2, however many addresses it has, and honest
    /// first logins keep the rest of the cores.
    pub suspect_logins_per_second: u32,
}

/// The failure tables.
#[derive(Clone)]
pub struct Throttle {
    addresses: Strikes<String>,
    places: Strikes<(String, String)>,
    usernames: Strikes<String>,
    known_places: Cache<(String, String), ()>,
    suspects: Arc<governor::DefaultDirectRateLimiter>,
}

impl Throttle {
    /// Empty tables with these limits.
    pub fn new(limits: FailureLimits) -> Throttle {
        Throttle {
            addresses: Strikes::new(limits.per_address, limits.address_window),
            places: Strikes::new(limits.per_user_address, limits.lockout),
            usernames: Strikes::new(
                limits
                    .per_user_address
                    .saturating_mul(USERNAME_FAILURES_PER_PAIR),
                limits.lockout,
            ),
            known_places: Cache::builder()
                .max_capacity(KNOWN_PLACES_MAX)
                .time_to_live(KNOWN_PLACE_TTL)
                .build(),
            suspects: Arc::new(governor::RateLimiter::direct(suspect_quota(
                limits.suspect_logins_per_second,
            ))),
        }
    }

    /// Whether `address` may try to authenticate (a token lookup); else how
    /// long until it may.
    pub fn check_address(&self, address: &str) -> Result<(), Duration> {
        self.addresses
            .blocked(&address.to_owned())
            .map_or(Ok(()), Err)
    }

    /// Counts a failed authentication from `address`.
    pub fn address_failed(&self, address: &str) {
        metrics::counter!("ledger_auth_failures_total").increment(1);
        self.addresses.strike(address.to_owned());
    }

    /// Whether a login as `username` from `address` may be tried (before
    /// any password hash); else how long until it may.
    pub fn check_login(&self, username: &str, address: &str) -> Result<(), Duration> {
        self.check_address(address)?;
        let user = username_key(username);
        let place = (user.clone(), address.to_owned());
        if let Some(wait) = self.places.blocked(&place) {
            return Err(wait);
        }
        if let Some(wait) = self.usernames.blocked(&user)
            && !self.known_places.contains_key(&place)
        {
            return Err(wait);
        }
        // An address that failed lately shares a small rate of hashes with
        // every other such address.
        if self.addresses.failures(&address.to_owned()) > 0 && self.suspects.check().is_err() {
            metrics::counter!("ledger_suspect_logins_refused_total").increment(1);
            return Err(Duration::from_secs(1));
        }
        Ok(())
    }

    /// Counts a failed login.
    pub fn login_failed(&self, username: &str, address: &str) {
        self.address_failed(address);
        let user = username_key(username);
        self.places.strike((user.clone(), address.to_owned()));
        self.usernames.strike(user);
    }

    /// Remembers a successful login's place and forgets its failures there.
    pub fn login_succeeded(&self, username: &str, address: &str) {
        let place = (username_key(username), address.to_owned());
        self.places.forgive(&place);
        self.known_places.insert(place, ());
    }
}

fn suspect_quota(per_second: u32) -> governor::Quota {
    let rate = NonZeroU32::new(per_second.max(1)).expect("BUG: max(1)");
    let burst = NonZeroU32::new(
        per_second
            .max(1)
            .saturating_mul(SUSPECT_LOGINS_BURST_SECONDS),
    )
    .expect("BUG: positive");
    governor::Quota::per_second(rate).allow_burst(burst)
}

/// A username as a fixed-size key (a login may name any text).
fn username_key(username: &str) -> String {
    sha256_hex(username.as_bytes())
}

/// The gate in front of argon2: at most `at_once` hashes run, at most
/// `queue_max` wait; past that a login is refused at once (503
/// `overloaded`), so a burst costs neither memory nor a growing queue.
#[derive(Clone)]
pub struct PasswordGate {
    admission: Arc<Semaphore>,
    running: Arc<Semaphore>,
}

/// A place among the hashes running; the hash runs while it is held.
pub struct HashPermit {
    _admitted: OwnedSemaphorePermit,
    _running: OwnedSemaphorePermit,
}

/// The gate's queue is full.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many password checks are waiting")]
pub struct GateFull;

impl PasswordGate {
    /// A gate running `at_once` hashes with `queue_max` waiting.
    pub fn new(at_once: usize, queue_max: usize) -> PasswordGate {
        let at_once = at_once.max(1);
        PasswordGate {
            admission: Arc::new(Semaphore::new(at_once + queue_max)),
            running: Arc::new(Semaphore::new(at_once)),
        }
    }

    /// Waits for a place to hash, unless the queue is full.
    pub async fn enter(&self) -> Result<HashPermit, GateFull> {
        let admitted = self.admission.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("ledger_password_checks_refused_total").increment(1);
            GateFull
        })?;
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .expect("BUG: the password gate is never closed");
        Ok(HashPermit {
            _admitted: admitted,
            _running: running,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FailureLimits {
        FailureLimits {
            per_address: 1_000,
            address_window: Duration::from_secs(60),
            per_user_address: 3,
            lockout: Duration::from_secs(900),
            suspect_logins_per_second: 5,
        }
    }

    #[test]
    fn one_address_locks_out_only_itself() {
        let throttle = Throttle::new(limits());
        for _ in 0..3 {
            assert!(throttle.check_login("alice", "10.0.0.66").is_ok());
            throttle.login_failed("alice", "10.0.0.66");
        }
        assert!(throttle.check_login("alice", "10.0.0.66").is_err());
        assert!(throttle.check_login("alice", "10.0.0.7").is_ok());
        assert!(throttle.check_login("bob", "10.0.0.66").is_ok());
    }

    #[test]
    fn a_crowd_of_addresses_cannot_lock_out_known_places() {
        let throttle = Throttle::new(limits());
        throttle.login_succeeded("alice", "10.0.0.7");
        let crowd = 3 * USERNAME_FAILURES_PER_PAIR;
        for bot in 0..crowd {
            let address = format!("10.1.{}.{}", bot / 256, bot % 256);
            for _ in 0..3 {
                throttle.login_failed("alice", &address);
            }
        }
        assert!(throttle.check_login("alice", "10.9.9.9").is_err());
        assert!(throttle.check_login("alice", "10.0.0.7").is_ok());
    }

    #[test]
    fn addresses_that_fail_too_often_wait() {
        let throttle = Throttle::new(FailureLimits {
            per_address: 2,
            ..limits()
        });
        throttle.address_failed("10.0.0.66");
        assert!(throttle.check_address("10.0.0.66").is_ok());
        throttle.address_failed("10.0.0.66");
        let wait = throttle.check_address("10.0.0.66").unwrap_err();
        assert!(wait <= Duration::from_secs(60));
        assert!(throttle.check_address("10.0.0.67").is_ok());
    }

    #[test]
    fn addresses_that_failed_share_a_small_rate_of_hashes() {
        let throttle = Throttle::new(limits());
        // Fresh addresses are never held back by it.
        for index in 0..100 {
            assert!(
                throttle
                    .check_login("alice", &format!("10.2.0.{index}"))
                    .is_ok()
            );
        }
        throttle.login_failed("bob", "10.6.6.6");
        throttle.login_failed("bob", "10.6.6.7");
        let allowed = (0..100)
            .filter(|index| {
                let address = if index % 2 == 0 {
                    "10.6.6.6"
                } else {
                    "10.6.6.7"
                };
                throttle
                    .check_login(&format!("user-{index}"), address)
                    .is_ok()
            })
            .count();
        assert!(allowed >= 10, "{allowed}");
        assert!(allowed < 50, "{allowed}");
        assert!(throttle.check_login("alice", "10.2.0.200").is_ok());
    }

    #[tokio::test]
    async fn a_full_gate_refuses_at_once() {
        let gate = PasswordGate::new(1, 1);
        let running = gate.enter().await.unwrap();
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter().await.map(|_| ()) }
        });
        while gate.admission.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        // One runs and one waits: a third is refused without waiting.
        assert!(gate.enter().await.is_err());
        drop(running);
        waiting.await.unwrap().unwrap();
    }
}
