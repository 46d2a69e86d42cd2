//! Authentication: argon2id password hashes (computed off the async
//! threads), opaque random bearer tokens stored only as SHA-256 hashes, and
//! the bootstrap admin.

use super::access::{AccessDb, UserRow};
use super::throttle::{HashPermit, PasswordGate};
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use moka::sync::Cache;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use uuid::Uuid;

/// Bytes of randomness in a token.
pub const TOKEN_BYTES: usize = 32;
/// How long a session lasts by default.
pub const SESSION_TTL_DEFAULT: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest accepted username, in characters.
pub const USERNAME_CHARS_MAX: usize = 64;
/// Shortest accepted password at creation, in characters.
pub const PASSWORD_CHARS_MIN: usize = 8;
/// Longest accepted password, in bytes (argon2 takes any length; this
/// bounds the work one request can cause).
pub const PASSWORD_BYTES_MAX: usize = 1024;
/// Sessions remembered in memory, so a request does not read the database
/// each time.
pub const SESSION_CACHE_MAX: u64 = 100_000;
/// How long a remembered session is trusted before it is read again (a
/// logout reaches every node's cache sooner: see `REVOCATION_POLL_PERIOD`).
pub const SESSION_CACHE_TTL: Duration = Duration::from_secs(30);
/// Well-formed tokens found to name no live session, remembered so asking
/// again costs no database round trip.
pub const UNKNOWN_TOKENS_MAX: u64 = 100_000;
/// How long an unknown token is remembered (a token is random and is
/// stored before it is handed out, so an unknown one never becomes valid).
pub const UNKNOWN_TOKEN_TTL: Duration = Duration::from_secs(60);
/// How often each node reads the sessions ended lately (logouts) and drops
/// them from its cache: a logout is seen everywhere within this, plus a
/// query.
pub const REVOCATION_POLL_PERIOD: Duration = Duration::from_millis(250);
/// How far back the revocation poll looks (it must exceed the clock skew
/// between nodes and any pause of the poll).
pub const REVOCATION_LOOKBACK: Duration = Duration::from_secs(60);
/// Most ended sessions one poll reads; with more, every cached session is
/// dropped (safe: they are read again).
pub const REVOCATIONS_PER_POLL_MAX: i64 = 10_000;

/// What a user may do (API.md, "Roles").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Own account and own orders only.
    Customer,
    /// Reads any account, ledger and order; moves no money.
    Support,
    /// Products, deposits, payouts.
    Operator,
    /// Events and audit.
    Auditor,
    /// Everything, and users.
    Admin,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Customer,
        Role::Support,
        Role::Operator,
        Role::Auditor,
        Role::Admin,
    ];

    /// Its name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Support => "support",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    /// The role with this exact name.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == name)
    }
}

/// The authenticated user of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user.
    pub user_id: String,
    /// Their role.
    pub role: Role,
    /// A customer's own account.
    pub account_id: Option<String>,
}

/// Argon2 verifications run so far (tests prove an unknown user costs one,
/// like a known one).
pub static VERIFICATIONS: AtomicU64 = AtomicU64::new(0);

/// Why a password cannot be hashed or checked.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The hashing task failed.
    #[error("password hashing failed: {0}")]
    Hashing(String),
}

/// Hashes a password with argon2id and a fresh salt, off the async threads.
pub async fn hash_password(password: String) -> Result<String, PasswordError> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|e| PasswordError::Hashing(e.to_string()))
    })
    .await
    .map_err(|e| PasswordError::Hashing(e.to_string()))?
}

/// Whether `password` matches a stored hash; with no stored hash (unknown
/// user) it checks against a hash nothing matches, so the work is the same.
pub async fn verify_password(password: String, stored: Option<String>) -> bool {
    let known = stored.is_some();
    let stored = stored.unwrap_or_else(|| unmatchable_hash().to_owned());
    let matched = tokio::task::spawn_blocking(move || {
        VERIFICATIONS.fetch_add(1, Ordering::Relaxed);
        Argon2::default()
            .verify_password(password.as_bytes(), stored.as_str())
            .is_ok()
    })
    .await
    .unwrap_or(false);
    known && matched
}

/// `verify_password`, holding the gate's permit until the hash is done
/// (even if the request that asked is dropped meanwhile).
async fn verify_password_holding(
    password: String,
    stored: Option<String>,
    permit: HashPermit,
) -> bool {
    let known = stored.is_some();
    let stored = stored.unwrap_or_else(|| unmatchable_hash().to_owned());
    let matched = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        VERIFICATIONS.fetch_add(1, Ordering::Relaxed);
        Argon2::default()
            .verify_password(password.as_bytes(), stored.as_str())
            .is_ok()
    })
    .await
    .unwrap_or(false);
    known && matched
}

/// A hash of random bytes nobody knows, with the default parameters.
fn unmatchable_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let secret = random_hex(TOKEN_BYTES);
        Argon2::default()
            .hash_password(secret.as_bytes())
            .expect("BUG: argon2 refused default parameters")
            .to_string()
    })
}

/// Warms the unmatchable hash, so the first unknown-user login is not the
/// one that pays for computing it.
pub async fn warm_up() {
    let _ = tokio::task::spawn_blocking(unmatchable_hash).await;
}

/// `n` random bytes from the operating system, as hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("BUG: the operating system has no randomness");
    hex::encode(bytes)
}

/// SHA-256 of some bytes, as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks a username at creation: 1 to 64 characters, no control
/// characters, no leading or trailing whitespace.
pub fn validate_username(username: &str) -> Result<(), &'static str> {
    let chars = username.chars().count();
    if chars == 0 || chars > USERNAME_CHARS_MAX {
        return Err("username must be 1 to 64 characters");
    }
    if username.trim() != username {
        return Err("username must not start or end with whitespace");
    }
    if username.chars().any(char::is_control) {
        return Err("username must not contain control characters");
    }
    Ok(())
}

/// Checks a password at creation.
pub fn validate_password(password: &str) -> Result<(), &'static str> {
    if password.chars().count() < PASSWORD_CHARS_MIN {
        return Err("password must be at least 8 characters");
    }
    if password.len() > PASSWORD_BYTES_MAX {
        return Err("password must be at most 1024 bytes");
    }
    Ok(())
}

/// A new session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The bearer token (shown once, never stored).
    pub token: String,
    /// The user.
    pub user: UserRow,
}

/// Sessions and their in-memory caches.
#[derive(Clone)]
pub struct Authenticator {
    db: AccessDb,
    session_ttl: Duration,
    /// Token hash → the caller and until when (Unix ms) it may be trusted.
    sessions: Cache<String, (Caller, i64)>,
    /// Token hashes that name no live session.
    unknown: Cache<String, ()>,
    /// Token hashes of sessions ended lately (a read of a session that
    /// raced its logout must not be trusted).
    ended: Cache<String, ()>,
    gate: PasswordGate,
    /// Sessions read from the database so far (tests prove the caches work).
    lookups: Arc<AtomicU64>,
}

/// What the caches say about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// A live session's caller.
    Known(Caller),
    /// Malformed, or known to name no live session.
    Refused,
    /// Not remembered: the database must be asked (with this token hash).
    Unknown(String),
}

/// Why a request's credentials were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Missing, malformed, unknown or expired (401).
    #[error("missing, malformed, expired or wrong credentials")]
    Unauthorized,
    /// Too many password checks are waiting (503 `overloaded`).
    #[error("too many password checks are waiting")]
    Overloaded,
    /// The database could not be asked.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl Authenticator {
    /// Sessions over the API's tables, lasting `session_ttl`, with
    /// passwords checked through `gate`.
    pub fn new(db: AccessDb, session_ttl: Duration, gate: PasswordGate) -> Authenticator {
        Authenticator {
            db,
            session_ttl,
            sessions: Cache::builder()
                .max_capacity(SESSION_CACHE_MAX)
                .time_to_live(SESSION_CACHE_TTL)
                .build(),
            unknown: Cache::builder()
                .max_capacity(UNKNOWN_TOKENS_MAX)
                .time_to_live(UNKNOWN_TOKEN_TTL)
                .build(),
            ended: Cache::builder()
                .max_capacity(SESSION_CACHE_MAX)
                .time_to_live(REVOCATION_LOOKBACK * 2)
                .build(),
            gate,
            lookups: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sessions read from the database so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Checks a username and password; a session on success. The hash
    /// waits its turn at the gate, or is refused when too many wait.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        now_ms: i64,
    ) -> Result<Session, AuthError> {
        let permit = self.gate.enter().await.map_err(|_| AuthError::Overloaded)?;
        let user = if password.len() > PASSWORD_BYTES_MAX
            || username.chars().count() > USERNAME_CHARS_MAX
        {
            None
        } else {
            self.db.user_by_name(username).await?
        };
        let stored = user.as_ref().map(|u| u.password_hash.clone());
        // The verification runs whether or not the user exists.
        let matched = verify_password_holding(password.to_owned(), stored, permit).await;
        let Some(user) = user.filter(|_| matched) else {
            return Err(AuthError::Unauthorized);
        };
        let token = random_hex(TOKEN_BYTES);
        let ttl_ms = i64::try_from(self.session_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let token_hash = sha256_hex(token.as_bytes());
        self.db
            .insert_session(&token_hash, &user.user_id, now_ms, now_ms + ttl_ms)
            .await?;
        let caller = Caller {
            user_id: user.user_id.clone(),
            role: Role::parse(&user.role).expect("BUG: a stored role is not a role"),
            account_id: user.account_id.clone(),
        };
        self.remember(token_hash, caller, now_ms + ttl_ms, now_ms);
        Ok(Session { token, user })
    }

    /// What the caches know of a token, without the database.
    pub fn cached(&self, token: &str, now_ms: i64) -> Cached {
        if token.len() != TOKEN_BYTES * 2 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Cached::Refused;
        }
        let token_hash = sha256_hex(token.as_bytes());
        if self.unknown.contains_key(&token_hash) || self.ended.contains_key(&token_hash) {
            return Cached::Refused;
        }
        match self.sessions.get(&token_hash) {
            Some((caller, until_ms)) if until_ms > now_ms => Cached::Known(caller),
            _ => Cached::Unknown(token_hash),
        }
    }

    /// Reads the session a token hash names (after `cached` said
    /// `Unknown`), and remembers the answer either way.
    pub async fn lookup(&self, token_hash: String, now_ms: i64) -> Result<Caller, AuthError> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let Some(session) = self.db.session(&token_hash, now_ms).await? else {
            self.unknown.insert(token_hash, ());
            return Err(AuthError::Unauthorized);
        };
        let role = Role::parse(&session.role).expect("BUG: a stored role is not a role");
        let caller = Caller {
            user_id: session.user_id,
            role,
            account_id: session.account_id,
        };
        self.remember(token_hash, caller.clone(), session.expires_at_ms, now_ms);
        Ok(caller)
    }

    fn remember(&self, token_hash: String, caller: Caller, expires_at_ms: i64, now_ms: i64) {
        let ttl_ms = i64::try_from(SESSION_CACHE_TTL.as_millis()).unwrap_or(i64::MAX / 2);
        let trust_until_ms = expires_at_ms.min(now_ms + ttl_ms);
        self.sessions.insert(token_hash, (caller, trust_until_ms));
    }

    /// The caller a bearer token stands for (the caches, then the database).
    pub async fn authenticate(&self, token: &str, now_ms: i64) -> Result<Caller, AuthError> {
        match self.cached(token, now_ms) {
            Cached::Known(caller) => Ok(caller),
            Cached::Refused => Err(AuthError::Unauthorized),
            Cached::Unknown(token_hash) => self.lookup(token_hash, now_ms).await,
        }
    }

    /// Ends the session of a token: it answers 401 from now on, here at
    /// once and on other nodes once their revocation poll has run.
    pub async fn logout(&self, token: &str, now_ms: i64) -> Result<(), AuthError> {
        let token_hash = sha256_hex(token.as_bytes());
        self.db.end_session(&token_hash, now_ms).await?;
        self.forget(token_hash);
        Ok(())
    }

    fn forget(&self, token_hash: String) {
        self.sessions.invalidate(&token_hash);
        self.ended.insert(token_hash, ());
    }

    /// Drops from the cache every session ended lately (by a logout on any
    /// node, or by expiry); run every `REVOCATION_POLL_PERIOD`.
    pub async fn poll_revocations(&self, now_ms: i64) -> Result<(), sqlx::Error> {
        let lookback_ms = i64::try_from(REVOCATION_LOOKBACK.as_millis()).unwrap_or(i64::MAX / 2);
        let ended = self
            .db
            .sessions_ended_since(now_ms - lookback_ms, now_ms, REVOCATIONS_PER_POLL_MAX)
            .await?;
        if ended.len() as i64 >= REVOCATIONS_PER_POLL_MAX {
            tracing::warn!(
                "more sessions ended lately than one poll reads; dropping every cached session"
            );
            self.sessions.invalidate_all();
        }
        for token_hash in ended {
            self.forget(token_hash);
        }
        Ok(())
    }

    /// Creates a user with a hashed password; false when the name is taken.
    pub async fn create_user(
        &self,
        username: &str,
        password: &str,
        role: Role,
        account_id: Option<String>,
        now_ms: i64,
    ) -> Result<Option<UserRow>, AuthError> {
        let _permit = self.gate.enter().await.map_err(|_| AuthError::Overloaded)?;
        let password_hash = hash_password(password.to_owned())
            .await
            .map_err(|e| AuthError::Database(sqlx::Error::Protocol(e.to_string())))?;
        let user = UserRow {
            user_id: Uuid::now_v7().to_string(),
            username: username.to_owned(),
            password_hash,
            role: role.as_str().to_owned(),
            account_id,
        };
        Ok(self.db.insert_user(&user, now_ms).await?.then_some(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_checked_exactly() {
        assert!(validate_username("alice").is_ok());
        assert!(validate_username("Alice Smith").is_ok());
        assert!(validate_username(" alice").is_err());
        assert!(validate_username("alice\t").is_err());
        assert!(validate_username("").is_err());
        assert!(validate_username("a\u{0}b").is_err());
        assert!(validate_username(&"x".repeat(65)).is_err());
    }

    #[test]
    fn roles_round_trip_by_name() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("Admin"), None);
        assert_eq!(Role::parse("admin "), None);
    }

    #[tokio::test]
    async fn hashes_verify_only_their_password() {
        let stored = hash_password("correct horse".to_owned()).await.unwrap();
        assert!(stored.starts_with("$argon2id$"));
        assert!(verify_password("correct horse".into(), Some(stored.clone())).await);
        for wrong in [
            "",
            "correct hors",
            "Correct horse",
            "correct horse ",
            "' OR '1'='1",
        ] {
            assert!(
                !verify_password(wrong.into(), Some(stored.clone())).await,
                "{wrong:?}"
            );
        }
        assert!(!verify_password("correct horse".into(), None).await);
    }
}
