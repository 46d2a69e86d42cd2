//! Authentication: argon2id password hashes (computed off the async
//! threads), opaque random bearer tokens stored only as SHA-256 hashes, and
//! the bootstrap admin.

use super::access::{AccessDb, UserRow};
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
pub const SESSION_CACHE_MAX: usize = 100_000;
/// How long a remembered session is trusted before it is read again.
pub const SESSION_CACHE_TTL_MS: i64 = 30_000;

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

/// Sessions and their in-memory cache.
#[derive(Clone)]
pub struct Authenticator {
    db: AccessDb,
    session_ttl: Duration,
    cache: Arc<Mutex<HashMap<String, (Caller, i64)>>>,
}

/// Why a request's credentials were not accepted (always answered 401).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Missing, malformed, unknown or expired.
    #[error("missing, malformed, expired or wrong credentials")]
    Unauthorized,
    /// The database could not be asked.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl Authenticator {
    /// Sessions over the API's tables, lasting `session_ttl`.
    pub fn new(db: AccessDb, session_ttl: Duration) -> Authenticator {
        Authenticator {
            db,
            session_ttl,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Checks a username and password; a session on success.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        now_ms: i64,
    ) -> Result<Session, AuthError> {
        let user = if password.len() > PASSWORD_BYTES_MAX {
            None
        } else {
            self.db.user_by_name(username).await?
        };
        let stored = user.as_ref().map(|u| u.password_hash.clone());
        // The verification runs whether or not the user exists.
        let matched = verify_password(password.to_owned(), stored).await;
        let Some(user) = user.filter(|_| matched) else {
            return Err(AuthError::Unauthorized);
        };
        let token = random_hex(TOKEN_BYTES);
        let ttl_ms = i64::try_from(self.session_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.db
            .insert_session(
                &sha256_hex(token.as_bytes()),
                &user.user_id,
                now_ms,
                now_ms + ttl_ms,
            )
            .await?;
        Ok(Session { token, user })
    }

    /// The caller a bearer token stands for.
    pub async fn authenticate(&self, token: &str, now_ms: i64) -> Result<Caller, AuthError> {
        if token.len() != TOKEN_BYTES * 2 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthError::Unauthorized);
        }
        let token_hash = sha256_hex(token.as_bytes());
        if let Some(caller) = self.cached(&token_hash, now_ms) {
            return Ok(caller);
        }
        let session = self
            .db
            .session(&token_hash, now_ms)
            .await?
            .ok_or(AuthError::Unauthorized)?;
        let role = Role::parse(&session.role).expect("BUG: a stored role is not a role");
        let caller = Caller {
            user_id: session.user_id,
            role,
            account_id: session.account_id,
        };
        let trust_until_ms = session.expires_at_ms.min(now_ms + SESSION_CACHE_TTL_MS);
        let mut cache = self.cache.lock().expect("BUG: session cache poisoned");
        if cache.len() >= SESSION_CACHE_MAX {
            cache.retain(|_, (_, until)| *until > now_ms);
            if cache.len() >= SESSION_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(token_hash, (caller.clone(), trust_until_ms));
        Ok(caller)
    }

    fn cached(&self, token_hash: &str, now_ms: i64) -> Option<Caller> {
        let cache = self.cache.lock().expect("BUG: session cache poisoned");
        cache
            .get(token_hash)
            .filter(|(_, until)| *until > now_ms)
            .map(|(caller, _)| caller.clone())
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
