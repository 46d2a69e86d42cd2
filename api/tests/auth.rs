//! Passwords, tokens and idempotency keys. One test per backend walks every
//! password case, so the global count of argon2 verifications is not
//! disturbed by another test's logins.

mod support;

use api::server::access::{AccessDb, Begun, KeyOp};
use api::server::auth::VERIFICATIONS;
use api::server::{Limits, Server, bootstrap_admin};
use axum::http::{Method, StatusCode};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;
use store::Backend;
use store::testing::TestPostgres;
use support::TestApi;

/// Held by every test of this file that verifies passwords, so counts of
/// verifications see only their own.
static VERIFYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn login(api: &TestApi, username: &str, password: &str) -> support::Reply {
    api.call(
        Method::POST,
        "/v1/auth/login",
        None,
        None,
        Some(json!({"username": username, "password": password})),
    )
    .await
}

async fn passwords(api: &TestApi) {
    api.user("Grace", "operator").await;
    let good = "Grace-password";
    let reply = login(api, "Grace", good).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["role"], "operator");
    assert_eq!(reply.body["account_id"], serde_json::Value::Null);
    let token = reply.body["token"].as_str().unwrap();
    assert_eq!(token.len(), 64, "256 random bits, hex");

    let wrong = [
        ("Grace", ""),
        ("Grace", "Grace-passwor"),
        ("Grace", "grace-password"),
        ("Grace", "GRACE-PASSWORD"),
        ("Grace", "Grace-password "),
        ("Grace", "' OR '1'='1"),
        ("Grace", "Grace-password' --"),
        ("grace", good),
        ("Grace ", good),
        ("' OR 1=1 --", good),
        ("nobody", good),
    ];
    for (username, password) in wrong {
        let before = VERIFICATIONS.load(Ordering::SeqCst);
        let reply = login(api, username, password).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{username:?} / {password:?}"
        );
        // A known and an unknown user both cost exactly one argon2
        // verification with the same parameters.
        assert_eq!(
            VERIFICATIONS.load(Ordering::SeqCst) - before,
            1,
            "{username:?}"
        );
        assert!(reply.body.get("token").is_none());
    }
    let malformed = api
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            None,
            Some(json!({"username": "Grace"})),
        )
        .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_exact_password_logs_in() {
    let _verifying = VERIFYING.lock().await;
    let api = TestApi::start(support::Kind::Sqlite, "passwords")
        .await
        .unwrap();
    passwords(&api).await;
    if let Some(postgres) = TestApi::start(support::Kind::Postgres, "passwords").await {
        passwords(&postgres).await;
        postgres.stop().await;
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_survive_a_restart_and_expire() {
    let _verifying = VERIFYING.lock().await;
    let folder = tempfile::tempdir().unwrap();
    let backend = Backend::Sqlite(folder.path().join("ledger.db"));
    let limits = Limits {
        session_ttl: Duration::from_secs(3),
        ..support::generous()
    };
    let server = Server::start(&backend, limits.clone(), Default::default())
        .await
        .unwrap();
    bootstrap_admin(&server.state, "root", "root-password")
        .await
        .unwrap();
    // A second bootstrap with another password changes nothing.
    bootstrap_admin(&server.state, "root", "other-password")
        .await
        .unwrap();
    let session = server
        .state
        .auth
        .login("root", "root-password", server.state.now_ms())
        .await
        .unwrap();
    assert!(
        server
            .state
            .auth
            .login("root", "other-password", server.state.now_ms())
            .await
            .is_err()
    );
    server.stop().await;

    let server = Server::start(&backend, limits, Default::default())
        .await
        .unwrap();
    let now = server.state.now_ms();
    let caller = server
        .state
        .auth
        .authenticate(&session.token, now)
        .await
        .unwrap();
    assert_eq!(caller.user_id, session.user.user_id);
    // The stored form is a hash: the token itself is nowhere in the table.
    let AccessDb::Sqlite(pool, _) = &server.state.access else {
        unreachable!()
    };
    let stored: Vec<(String,)> = sqlx::query_as("SELECT token_hash FROM sessions")
        .fetch_all(pool)
        .await
        .unwrap();
    assert!(stored.iter().all(|(hash,)| hash != &session.token));
    assert!(
        server
            .state
            .auth
            .authenticate(&session.token, now + 4_000)
            .await
            .is_err()
    );
    server.stop().await;
}

async fn idempotency_keys(db: &AccessDb) {
    let (user, key) = ("user-1", "key-1");
    assert_eq!(
        db.begin(user, key, "hash-a", 1_000, 500).await.unwrap(),
        Begun::Run
    );
    assert_eq!(
        db.begin(user, key, "hash-a", 1_100, 500).await.unwrap(),
        Begun::InFlight
    );
    assert_eq!(
        db.begin(user, key, "hash-b", 1_100, 500).await.unwrap(),
        Begun::Reused
    );
    // Another caller's key of the same name is theirs.
    assert_eq!(
        db.begin("user-2", key, "hash-b", 1_100, 500).await.unwrap(),
        Begun::Run
    );
    // Abandoned by a crash: after its lock, one retry takes it over.
    assert_eq!(
        db.begin(user, key, "hash-a", 1_600, 500).await.unwrap(),
        Begun::Run
    );
    assert_eq!(
        db.begin(user, key, "hash-a", 1_700, 500).await.unwrap(),
        Begun::InFlight
    );
    db.complete(user, key, 201, "{\"ok\":true}").await.unwrap();
    assert_eq!(
        db.begin(user, key, "hash-a", 9_000, 500).await.unwrap(),
        Begun::Replay {
            status: 201,
            body: "{\"ok\":true}".into()
        }
    );
    assert_eq!(
        db.begin(user, key, "hash-b", 9_000, 500).await.unwrap(),
        Begun::Reused
    );
    // One batch, as the API's writer sends it: new claims, a second claim
    // of a key claimed earlier in the batch, a replay and a reuse.
    let claim = |key: &str, hash: &str| KeyOp::Begin {
        user_id: user.to_owned(),
        key: key.to_owned(),
        request_hash: hash.to_owned(),
        now_ms: 9_000,
        lock_ms: 500,
    };
    let results = db
        .apply_key_ops(&[
            claim("batch-1", "h1"),
            claim("batch-2", "h2"),
            claim("batch-1", "h1"),
            claim(key, "hash-a"),
            claim("batch-2", "other"),
        ])
        .await
        .unwrap();
    assert_eq!(
        results,
        vec![
            Begun::Run,
            Begun::Run,
            Begun::InFlight,
            Begun::Replay {
                status: 201,
                body: "{\"ok\":true}".into()
            },
            Begun::Reused,
        ]
    );
    let answers = db
        .apply_key_ops(&[
            KeyOp::Complete {
                user_id: user.to_owned(),
                key: "batch-1".to_owned(),
                status: 409,
                body: "{}".to_owned(),
            },
            claim("batch-1", "h1"),
        ])
        .await
        .unwrap();
    assert_eq!(
        answers[1],
        Begun::Replay {
            status: 409,
            body: "{}".into()
        }
    );
    // A released key runs again.
    assert_eq!(
        db.begin(user, "key-2", "hash-c", 1_000, 500).await.unwrap(),
        Begun::Run
    );
    db.abandon(user, "key-2").await.unwrap();
    assert_eq!(
        db.begin(user, "key-2", "hash-d", 1_000, 500).await.unwrap(),
        Begun::Run
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_run_once_replay_and_refuse_reuse() {
    let folder = tempfile::tempdir().unwrap();
    let backend = Backend::Sqlite(folder.path().join("ledger.db"));
    store::migrate(&backend).await.unwrap();
    idempotency_keys(&AccessDb::open(&backend).await.unwrap()).await;
    if let Some(database) = TestPostgres::create("idempotency_keys").await {
        let backend = Backend::Postgres(database.url.clone());
        store::migrate(&backend).await.unwrap();
        idempotency_keys(&AccessDb::open(&backend).await.unwrap()).await;
    }
}

/// Writers of idempotency keys on one PostgreSQL database, as several nodes
/// run them.
const KEY_WRITERS: usize = 4;
/// Rounds of overlapping batches.
const KEY_ROUNDS: usize = 40;
/// Keys every writer claims in a round (and answers in the next).
const KEYS_PER_ROUND: usize = 120;

fn round_keys(round: usize) -> Vec<(String, String)> {
    (0..KEYS_PER_ROUND)
        .map(|i| (format!("user-{}", i % 7), format!("round-{round}-key-{i}")))
        .collect()
}

/// One writer's batch for a round: claims of this round's keys and answers
/// of the last round's, shuffled in an order of its own.
fn writer_batch(writer: usize, round: usize) -> Vec<KeyOp> {
    use rand::SeedableRng as _;
    use rand::seq::SliceRandom as _;
    let mut ops: Vec<KeyOp> = round_keys(round)
        .into_iter()
        .map(|(user_id, key)| KeyOp::Begin {
            user_id,
            key,
            request_hash: "hash".into(),
            now_ms: 1_000,
            lock_ms: 3_600_000,
        })
        .collect();
    if round > 0 {
        ops.extend(
            round_keys(round - 1)
                .into_iter()
                .map(|(user_id, key)| KeyOp::Complete {
                    user_id,
                    key,
                    status: 201,
                    body: format!("writer-{writer}"),
                }),
        );
    }
    let seed = (writer * 1_000 + round) as u64;
    ops.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    ops
}

/// Several pools write overlapping batches of the same keys in different
/// orders at once (the storm of issue 19 that PostgreSQL answered with
/// "deadlock detected" and the API with 500). No batch may fail, every key
/// is claimed by exactly one writer, answered once, and replays that one
/// answer to every writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_key_batches_from_several_pools_neither_deadlock_nor_fail() {
    let Some(database) = TestPostgres::create(
        "overlapping_key_batches_from_several_pools_neither_deadlock_nor_fail",
    )
    .await
    else {
        return;
    };
    let backend = Backend::Postgres(database.url.clone());
    store::migrate(&backend).await.unwrap();
    let mut writers = Vec::new();
    for _ in 0..KEY_WRITERS {
        writers.push(AccessDb::open(&backend).await.unwrap());
    }
    for round in 0..=KEY_ROUNDS {
        let batches = writers.iter().enumerate().map(|(writer, db)| {
            let db = db.clone();
            tokio::spawn(async move {
                let ops = if round < KEY_ROUNDS {
                    writer_batch(writer, round)
                } else {
                    // The last answers only.
                    writer_batch(writer, round)
                        .into_iter()
                        .filter(|op| matches!(op, KeyOp::Complete { .. }))
                        .collect()
                };
                let results = db.apply_key_ops(&ops).await;
                (ops, results)
            })
        });
        let mut runs = std::collections::HashMap::new();
        for batch in futures::future::join_all(batches).await {
            let (ops, results) = batch.unwrap();
            let results = results.unwrap_or_else(|error| {
                panic!("round {round}: a key batch failed (would be a 5xx): {error}")
            });
            assert_eq!(results.len(), ops.len());
            for (op, result) in ops.iter().zip(results) {
                match (op, result) {
                    (KeyOp::Begin { key, .. }, Begun::Run) => {
                        *runs.entry(key.clone()).or_insert(0) += 1
                    }
                    (KeyOp::Begin { .. }, Begun::InFlight)
                    | (KeyOp::Complete { .. }, Begun::Run) => {}
                    (op, result) => panic!("round {round}: {op:?} answered {result:?}"),
                }
            }
        }
        if round < KEY_ROUNDS {
            for (_, key) in round_keys(round) {
                assert_eq!(
                    runs.get(&key),
                    Some(&1),
                    "round {round}: {key} claimed once"
                );
            }
        }
    }
    // Every key holds one answer, and every writer replays that same one.
    let keys: Vec<(String, String)> = (0..KEY_ROUNDS).flat_map(round_keys).collect();
    let replays: Vec<KeyOp> = keys
        .iter()
        .map(|(user_id, key)| KeyOp::Begin {
            user_id: user_id.clone(),
            key: key.clone(),
            request_hash: "hash".into(),
            now_ms: 2_000,
            lock_ms: 1_000,
        })
        .collect();
    let mut first: Option<Vec<Begun>> = None;
    for db in &writers {
        let answers = db.apply_key_ops(&replays).await.unwrap();
        for ((_, key), answer) in keys.iter().zip(&answers) {
            let Begun::Replay { status: 201, body } = answer else {
                panic!("{key} has no answer: {answer:?}");
            };
            assert!(body.starts_with("writer-"), "{key}: {body}");
        }
        match &first {
            None => first = Some(answers),
            Some(first) => assert_eq!(first, &answers, "writers replay different answers"),
        }
    }
    let AccessDb::Postgres(pool) = &writers[0] else {
        unreachable!("a PostgreSQL backend");
    };
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM idempotency_keys")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, keys.len() as i64, "one row per key");
}
