//! Deterministic simulation of the purchase workflow.
//!
//! Each seed drives two engine nodes on one in-memory log through a random
//! schedule: purchases (new, duplicate and delayed retries) on either node,
//! appends rolled back by injected faults, node crashes and restarts, and
//! clock jumps past reservation expiry. After every step the always-true
//! invariants are checked against the log; at the end faults stop, nodes
//! restart, time passes, every purchase is retried until it has an answer,
//! and the settled invariants and the answers' consistency are checked.
//!
//! `LEDGER_SIM_SEEDS=N` sets how many seeds run (default 2000);
//! `LEDGER_SIM_SEED=S` replays one seed. A failure prints its seed.

mod support;

use async_trait::async_trait;
use chrono::Duration;
use domain::product::ReservationState;
use domain::{AccountId, ProductId};
use engine::{
    Engine, EngineSettings, ManualClock, PurchaseError, PurchaseReceipt, PurchaseRequest,
    RequestContext,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use store::{AppendHook, MemoryEventStore, StoreError};
use support::{
    Checks, amount, audit, check_read_models, funded_account, open_product, start, terms,
};
use uuid::Uuid;

const BUYERS: u128 = 4;

/// What all seeds together exercised; checked at the end of a multi-seed run
/// so the simulation cannot quietly stop injecting what it claims to.
#[derive(Debug, Default)]
struct Coverage {
    faults: u64,
    crashes: u64,
    clock_jumps: u64,
    retries: u64,
    cancellations: u64,
    product_conflicts: u64,
    confirmed: u64,
    refused: u64,
    expired: u64,
    refunds: u64,
}

static COVERAGE: Mutex<Coverage> = Mutex::new(Coverage {
    faults: 0,
    crashes: 0,
    clock_jumps: 0,
    retries: 0,
    cancellations: 0,
    product_conflicts: 0,
    confirmed: 0,
    refused: 0,
    expired: 0,
    refunds: 0,
});
const STEPS: usize = 40;
const TTL_SECONDS: i64 = 30;
/// Every this many seeds, the read models are built from the log and checked.
const READ_MODEL_SEEDS_EVERY: u64 = 20;

/// Rolls back appends at random while armed.
struct Faults {
    rng: Mutex<StdRng>,
    armed: AtomicBool,
    injected: AtomicU32,
}

#[async_trait]
impl AppendHook for Faults {
    async fn before_commit(&self, _streams: &[&str]) -> Result<(), StoreError> {
        if self.armed.load(Ordering::SeqCst) && self.rng.lock().unwrap().random_bool(0.08) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Injected("simulated crash before commit".into()));
        }
        Ok(())
    }
}

type Answer = Result<PurchaseReceipt, PurchaseError>;
/// Every key tried: its amount and the definitive answers seen.
type AnswerLog = HashMap<(AccountId, String), (i64, Vec<Answer>)>;

struct World {
    log: MemoryEventStore,
    faults: Arc<Faults>,
    clock: Arc<ManualClock>,
    nodes: Vec<Engine>,
    product_id: ProductId,
    /// Every key tried, with its amount and the definitive answers seen.
    answers: Arc<Mutex<AnswerLog>>,
    /// The seed of this run.
    seed: u64,
}

impl World {
    fn node(&self) -> Engine {
        Engine::new(
            Arc::new(self.log.with_hook(self.faults.clone())),
            self.clock.clone(),
            settings(),
        )
    }

    fn request(&self, account_id: AccountId, key: &str, minor: i64) -> PurchaseRequest {
        PurchaseRequest {
            product_id: self.product_id.clone(),
            account_id,
            amount: amount(minor),
            idempotency_key: key.to_owned(),
            context: RequestContext::user(account_id.to_string(), "customer", None),
        }
    }

    /// Sends a purchase to a node in the background and records a definitive answer.
    fn submit(&self, node: usize, account_id: AccountId, key: String, minor: i64) {
        let engine = self.nodes[node].clone();
        let request = self.request(account_id, &key, minor);
        let answers = self.answers.clone();
        answers
            .lock()
            .unwrap()
            .entry((account_id, key.clone()))
            .or_insert((minor, Vec::new()));
        tokio::spawn(async move {
            let answer = engine.purchase(request).await;
            if !matches!(
                answer,
                Err(PurchaseError::Unavailable(_) | PurchaseError::Overloaded)
            ) {
                answers
                    .lock()
                    .unwrap()
                    .get_mut(&(account_id, key))
                    .unwrap()
                    .1
                    .push(answer);
            }
        });
    }
}

fn settings() -> EngineSettings {
    EngineSettings {
        reservation_ttl: Duration::seconds(TTL_SECONDS),
        batch_max: 8,
        ..EngineSettings::default()
    }
}

async fn simulate(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let faults = Arc::new(Faults {
        rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed)),
        armed: AtomicBool::new(false),
        injected: AtomicU32::new(0),
    });
    let mut world = World {
        log: MemoryEventStore::new(),
        faults,
        clock: Arc::new(ManualClock::new(start())),
        nodes: Vec::new(),
        product_id: ProductId::parse("sim").unwrap(),
        answers: Arc::new(Mutex::new(HashMap::new())),
        seed,
    };
    world.nodes = vec![world.node(), world.node()];
    let quota = rng.random_range(20..80);
    open_product(&world.nodes[0], &world.product_id, terms(quota, 1, 20)).await;
    for buyer in 0..BUYERS {
        funded_account(
            &world.nodes[0],
            AccountId(Uuid::from_u128(buyer + 1)),
            rng.random_range(0..60),
        )
        .await;
    }
    world.faults.armed.store(true, Ordering::SeqCst);
    let mut coverage = Coverage::default();
    let mut keys: Vec<(AccountId, String, i64)> = Vec::new();
    for step in 0..STEPS {
        match rng.random_range(0..100) {
            0..=44 => {
                let account_id = AccountId(Uuid::from_u128(rng.random_range(1..=BUYERS)));
                let key = format!("k{step}");
                let minor = rng.random_range(0..25);
                keys.push((account_id, key.clone(), minor));
                world.submit(rng.random_range(0..2), account_id, key, minor);
            }
            45..=59 if !keys.is_empty() => {
                // A duplicate or delayed retry of an earlier purchase, on either node.
                let (account_id, key, minor) = keys[rng.random_range(0..keys.len())].clone();
                world.submit(rng.random_range(0..2), account_id, key, minor);
                coverage.retries += 1;
            }
            60..=69 => {
                world
                    .clock
                    .advance(Duration::seconds(rng.random_range(1..2 * TTL_SECONDS)));
                coverage.clock_jumps += 1;
            }
            78..=83 if !keys.is_empty() => {
                // An operator cancels an order, on either node, racing the workflow.
                let (account_id, key, _) = &keys[rng.random_range(0..keys.len())];
                let order_id = engine::order_id_for(&world.product_id, *account_id, key);
                let cancel = domain::product::ProductCommand::Release {
                    order_id,
                    reason: domain::product::ReleaseReason::Cancelled,
                };
                let node = world.nodes[rng.random_range(0..2)].clone();
                let product_id = world.product_id.clone();
                tokio::spawn(async move {
                    let _ = node
                        .product_command(
                            &product_id,
                            cancel,
                            RequestContext::user("op", "operator", None),
                        )
                        .await;
                });
                coverage.cancellations += 1;
            }
            70..=77 => {
                let node = rng.random_range(0..2);
                coverage.product_conflicts += world.nodes[node].stats().product_conflicts;
                coverage.crashes += 1;
                world.nodes[node].halt();
                world.nodes[node] = world.node();
            }
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(0..40))).await;
        audit(&world.log).await.check_always();
    }
    coverage.faults = u64::from(world.faults.injected.load(Ordering::SeqCst));
    settle(&mut world, &keys, coverage).await;
}

/// Stops faults, restarts the nodes, lets expiry and recovery run, retries
/// every purchase until it has an answer, then checks everything.
async fn settle(world: &mut World, keys: &[(AccountId, String, i64)], mut coverage: Coverage) {
    world.faults.armed.store(false, Ordering::SeqCst);
    for node in 0..2 {
        coverage.product_conflicts += world.nodes[node].stats().product_conflicts;
        world.nodes[node].halt();
        world.nodes[node] = world.node();
    }
    world.clock.advance(Duration::seconds(2 * TTL_SECONDS));
    for (account_id, key, minor) in keys {
        let answer = world.nodes[0]
            .purchase(world.request(*account_id, key, *minor))
            .await;
        assert!(
            !matches!(answer, Err(PurchaseError::Unavailable(_))),
            "no answer after recovery: {answer:?}"
        );
        world
            .answers
            .lock()
            .unwrap()
            .get_mut(&(*account_id, key.clone()))
            .unwrap()
            .1
            .push(answer);
    }
    // Recovery runs in the writer's loop; give it a few sweeps.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let audit = audit(&world.log).await;
    audit.check_settled();
    if world.seed.is_multiple_of(READ_MODEL_SEEDS_EVERY) {
        // The read models must fold whatever the engine wrote under faults.
        // They run on a runtime of their own: this one's clock is paused.
        let log: Arc<dyn store::EventStore> = Arc::new(world.log.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(async {
                    let audit = engine::audit::audit(log.as_ref()).await.expect("readable");
                    check_read_models(log, &audit).await;
                });
        })
        .join()
        .expect("read models agree with the engine's log");
    }
    for product in audit.products.values().filter_map(|p| p.sale.as_ref()) {
        let expired = product
            .reservations
            .values()
            .filter(|r| r.released_because == Some(domain::product::ReleaseReason::Expired));
        coverage.expired += expired.count() as u64;
    }
    let refunded = audit
        .accounts
        .values()
        .filter_map(|a| a.account.as_ref())
        .flat_map(|a| a.purchases.values())
        .filter(|p| p.refunded);
    coverage.refunds += refunded.count() as u64;
    let answers = world.answers.lock().unwrap();
    let successes = answers.values().filter(|(_, seen)| seen[0].is_ok()).count();
    assert_eq!(
        audit.oracle.confirmed_orders(&world.product_id),
        successes,
        "seed {}: confirmed orders in the log (oracle) = successful purchases",
        world.seed
    );
    for (_, seen) in answers.values() {
        match seen[0] {
            Ok(_) => coverage.confirmed += 1,
            Err(_) => coverage.refused += 1,
        }
    }
    let mut total = COVERAGE.lock().unwrap();
    total.faults += coverage.faults;
    total.crashes += coverage.crashes;
    total.clock_jumps += coverage.clock_jumps;
    total.retries += coverage.retries;
    total.cancellations += coverage.cancellations;
    total.product_conflicts += coverage.product_conflicts;
    total.confirmed += coverage.confirmed;
    total.refused += coverage.refused;
    total.expired += coverage.expired;
    total.refunds += coverage.refunds;
    drop(total);
    for ((account_id, key), (_, seen)) in answers.iter() {
        let first = &seen[0];
        // A refusal stays a refusal. Its reason is exact, except that a node
        // that has not yet read another node's refusal of this order may answer
        // `SoldOut` from memory once the product is sold out (which is final).
        let consistent = |answer: &Answer| {
            answer == first || (first.is_err() && answer == &Err(PurchaseError::SoldOut))
        };
        assert!(
            seen.iter().all(consistent),
            "{key}: answers differ: {seen:?}"
        );
        let state = audit.reservation(&engine::order_id_for(&world.product_id, *account_id, key));
        match first {
            Ok(_) => assert_eq!(
                state,
                Some(ReservationState::Confirmed),
                "{key}: success without a confirmed order"
            ),
            Err(_) => assert_ne!(
                state,
                Some(ReservationState::Confirmed),
                "{key}: refusal with a confirmed order"
            ),
        }
    }
}

fn run_seed(seed: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(simulate(seed))
    }));
    if let Err(panic) = outcome {
        eprintln!("simulation failed for seed {seed}; replay with LEDGER_SIM_SEED={seed}");
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn purchase_workflow_survives_faults_under_a_seeded_scheduler() {
    if let Ok(seed) = std::env::var("LEDGER_SIM_SEED") {
        run_seed(seed.parse().expect("LEDGER_SIM_SEED is a number"));
        return;
    }
    let seeds: u64 = std::env::var("LEDGER_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    for seed in 0..seeds {
        run_seed(seed);
    }
    let total = COVERAGE.lock().unwrap();
    eprintln!("simulation coverage over {seeds} seeds: {total:?}");
    if seeds >= 500 {
        let exercised = [
            total.faults,
            total.crashes,
            total.clock_jumps,
            total.retries,
            total.cancellations,
            total.product_conflicts,
            total.confirmed,
            total.refused,
            total.expired,
        ];
        // Refunds are reported but not required: the account book re-reads
        // the store before a refusal, which closes most of the race that needs
        // one; tests/recovery.rs drives that path directly.
        assert!(
            exercised.iter().all(|&n| n > 0),
            "a fault or outcome was never exercised: {total:?}"
        );
    }
}
