//! Product leases in the engine: a writer whose lease another node took
//! decides nothing more and names the owner; a writer that gets its lease
//! back under a new epoch reloads before deciding; a node that is not the
//! owner starts no writer. Leases here are an in-memory `LeaseStore` the
//! test hands from node to node.

mod support;

use async_trait::async_trait;
use domain::{AccountId, ProductId};
use engine::{
    ClusterSettings, Engine, EngineSettings, PurchaseError, PurchaseRequest, RequestContext,
    SystemClock,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::lease::{Claim, LeaseInfo, LeaseStore, NodeAddress};
use store::{EventStore, MemoryEventStore, StoreError};
use support::{Checks, amount, audit, funded_account, open_product, terms};
use uuid::Uuid;

const TTL: Duration = Duration::from_millis(600);
const RENEW: Duration = Duration::from_millis(200);

/// One lease per test: its holder and epoch.
#[derive(Default)]
struct HandedLeases {
    lease: Mutex<(Option<NodeAddress>, i64)>,
}

impl HandedLeases {
    /// Another node takes the lease (as after the holder's lapsed).
    fn hand_to(&self, node: &NodeAddress) {
        let mut lease = self.lease.lock().unwrap();
        *lease = (Some(node.clone()), lease.1 + 1);
    }

    fn info(holder: &NodeAddress, epoch: i64) -> LeaseInfo {
        LeaseInfo {
            holder: holder.clone(),
            epoch,
            remaining: TTL,
        }
    }
}

#[async_trait]
impl LeaseStore for HandedLeases {
    async fn claim(
        &self,
        _product_id: &ProductId,
        node: &NodeAddress,
        _ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let mut lease = self.lease.lock().unwrap();
        match &lease.0 {
            Some(holder) if holder != node => Ok(Claim::Elsewhere(Self::info(holder, lease.1))),
            Some(_) => Ok(Claim::Held(Self::info(node, lease.1))),
            None => {
                *lease = (Some(node.clone()), lease.1 + 1);
                Ok(Claim::Held(Self::info(node, lease.1)))
            }
        }
    }

    async fn renew(
        &self,
        _product_id: &ProductId,
        node: &NodeAddress,
        epoch: i64,
        _ttl: Duration,
    ) -> Result<bool, StoreError> {
        let lease = self.lease.lock().unwrap();
        Ok(lease.0.as_ref() == Some(node) && lease.1 == epoch)
    }

    async fn release(
        &self,
        _product_id: &ProductId,
        node: &NodeAddress,
        epoch: i64,
    ) -> Result<(), StoreError> {
        let mut lease = self.lease.lock().unwrap();
        if lease.0.as_ref() == Some(node) && lease.1 == epoch {
            lease.0 = None;
        }
        Ok(())
    }
}

fn node(name: &str) -> NodeAddress {
    NodeAddress {
        node_id: name.into(),
        url: format!("http://{name}.invalid"),
    }
}

fn engine(store: &Arc<dyn EventStore>, leases: &Arc<HandedLeases>, name: &str) -> Engine {
    let leases: Arc<dyn LeaseStore> = leases.clone();
    Engine::with_cluster(
        store.clone(),
        Arc::new(SystemClock),
        EngineSettings::default(),
        ClusterSettings::member(node(name), leases, TTL, RENEW),
    )
}

fn purchase(product_id: &ProductId, buyer: AccountId, key: &str) -> PurchaseRequest {
    PurchaseRequest {
        product_id: product_id.clone(),
        account_id: buyer,
        amount: amount(100),
        idempotency_key: key.into(),
        context: RequestContext::user("buyer", "customer", None),
    }
}

async fn product_version(store: &Arc<dyn EventStore>, product_id: &ProductId) -> usize {
    store
        .read_stream(&product_id.stream(), 0, 10_000)
        .await
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_lease_was_taken_decides_nothing_and_names_the_owner() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let leases = Arc::new(HandedLeases::default());
    let first = engine(&store, &leases, "first");
    let product_id = ProductId::parse("leased").unwrap();
    open_product(&first, &product_id, terms(10_000, 100, 100)).await;
    let buyer = AccountId(Uuid::from_u128(7));
    funded_account(&first, buyer, 10_000).await;
    first
        .purchase(purchase(&product_id, buyer, "before"))
        .await
        .expect("the owner decides");
    assert_eq!(first.stats().leases_claimed, 1);

    // Another node takes the lease; the first one's next renewal fails.
    leases.hand_to(&node("second"));
    tokio::time::sleep(RENEW * 2).await;
    let version = product_version(&store, &product_id).await;
    let refused = first.purchase(purchase(&product_id, buyer, "after")).await;
    assert_eq!(refused, Err(PurchaseError::NotOwner(node("second"))));
    assert_eq!(
        product_version(&store, &product_id).await,
        version,
        "nothing appended"
    );
    assert_eq!(first.stats().leases_lost, 1);
    // Known now: answered from memory, no writer started, no claim made.
    let again = first.purchase(purchase(&product_id, buyer, "again")).await;
    assert_eq!(again, Err(PurchaseError::NotOwner(node("second"))));
    assert_eq!(first.owner_elsewhere(&product_id), Some(node("second")));
    assert!(first.queue_depths().is_empty(), "no writer runs here");
    assert_eq!(first.stats().owner_found_elsewhere, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_regained_under_a_new_epoch_reloads_before_deciding() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let leases = Arc::new(HandedLeases::default());
    let (first, second) = (
        engine(&store, &leases, "first"),
        engine(&store, &leases, "second"),
    );
    let product_id = ProductId::parse("handed").unwrap();
    // Quota for three purchases of 100.
    open_product(&first, &product_id, terms(300, 100, 100)).await;
    let buyer = AccountId(Uuid::from_u128(8));
    funded_account(&first, buyer, 10_000).await;
    first
        .purchase(purchase(&product_id, buyer, "one"))
        .await
        .unwrap();

    // The second node takes over and sells while the first's lease lapsed.
    leases.hand_to(&node("second"));
    tokio::time::sleep(RENEW * 2).await;
    second
        .purchase(purchase(&product_id, buyer, "two"))
        .await
        .unwrap();
    second
        .purchase(purchase(&product_id, buyer, "three"))
        .await
        .unwrap();
    // It hands the lease back (as when its writer stops for idleness).
    leases.hand_to(&node("first"));
    tokio::time::sleep(TTL).await; // the first node's memory of the owner runs out
    let late = first.purchase(purchase(&product_id, buyer, "four")).await;
    // Decided on the reloaded state: sold out, not a fourth sale.
    assert_eq!(late, Err(PurchaseError::SoldOut));
    assert_eq!(
        first.stats().product_conflicts,
        0,
        "reloaded before deciding"
    );
    let audit = audit(store.as_ref()).await;
    audit.check_settled();
    assert_eq!(audit.oracle.confirmed(&product_id), 300);
}
