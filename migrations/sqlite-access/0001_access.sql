-- Who may call the API, their sessions, and the answers already given to
-- idempotent requests. This is operational state of the API, not ledger
-- truth: money moves only through events in the log. Times are Unix
-- milliseconds (UTC).
--
-- On SQLite these tables live in their own file (`access.db` beside
-- `ledger.db`), so writing idempotency keys never waits for SQLite's one
-- write lock behind the log's appends. On PostgreSQL they are migration 0004
-- of the ledger's database.

-- Users. Usernames are case-sensitive and unique as stored. Passwords are
-- kept only as argon2id PHC strings. A customer has an account in the log.
CREATE TABLE users (
    user_id        TEXT PRIMARY KEY,
    username       TEXT NOT NULL,
    password_hash  TEXT NOT NULL,
    role           TEXT NOT NULL,
    account_id     TEXT,
    created_at_ms  BIGINT NOT NULL,
    CONSTRAINT users_username_unique UNIQUE (username)
);

-- Sessions: a login's bearer token, stored only as its SHA-256 (the token is
-- 256 random bits, so a fast hash is enough; a leaked table grants nothing).
CREATE TABLE sessions (
    token_hash     TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL REFERENCES users (user_id),
    created_at_ms  BIGINT NOT NULL,
    expires_at_ms  BIGINT NOT NULL
);
CREATE INDEX sessions_expiry ON sessions (expires_at_ms);

-- Idempotency keys, per caller. `request_hash` covers the method, path and
-- body, so the same key with another request is refused. A row without a
-- status is in flight; one whose `locked_until_ms` passed was abandoned by a
-- crashed request and may be taken over (the commands behind every POST are
-- themselves idempotent, so running one again is safe).
CREATE TABLE idempotency_keys (
    user_id          TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL,
    request_hash     TEXT NOT NULL,
    status           BIGINT,
    response_body    TEXT,
    locked_until_ms  BIGINT NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
);
