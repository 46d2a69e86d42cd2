//! One owner per product across the cluster: the lease a product's writer
//! holds while it lives, and this node's memory of which other node owns
//! what (so routing a request costs no database round trip).
//!
//! A writer claims its product's lease before its first decision, renews it
//! every `renew_period` from a task of its own, checks it is still live
//! before every turn and every append, and releases it when it stops for
//! idleness. A writer whose lease lapsed (its renewals failed, or its
//! process was stopped) claims again: if another node took the lease it
//! stops and its callers are told `NotOwner`; if it gets the lease back
//! under a new epoch it reloads the product before deciding anything.
//! Whatever the leases say, the product stream's expected version stays
//! the fence: an append decided on a stale state conflicts.

use crate::stats::EngineStats;
use domain::ProductId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::StoreError;
use store::lease::{Claim, LeaseInfo, LeaseStore, NodeAddress, SoleNodeLeases};
use tokio::time::Instant;

/// How long a lease runs without renewal (a dead owner's products are taken
/// over at most this long after its last renewal).
pub const LEASE_TTL_DEFAULT: Duration = Duration::from_secs(3);
/// How often a live writer renews its lease.
pub const LEASE_RENEW_PERIOD_DEFAULT: Duration = Duration::from_secs(1);
/// Products another node owns that this node remembers (only listed
/// products get here: bounded by the catalogue).
pub const OWNERS_REMEMBERED_MAX: usize = 100_000;

/// How this node takes part in a cluster.
#[derive(Clone)]
pub struct ClusterSettings {
    /// This node, as leases name it.
    pub node: NodeAddress,
    /// Where leases live.
    pub leases: Arc<dyn LeaseStore>,
    /// How long a lease runs without renewal.
    pub lease_ttl: Duration,
    /// How often a live writer renews its lease (well under `lease_ttl`).
    pub renew_period: Duration,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("node", &self.node)
            .field("lease_ttl", &self.lease_ttl)
            .field("renew_period", &self.renew_period)
            .finish_non_exhaustive()
    }
}

impl ClusterSettings {
    /// A node alone: it owns every product (other processes on the same
    /// log are fenced by the stream's expected version alone).
    pub fn sole_node() -> ClusterSettings {
        ClusterSettings {
            node: NodeAddress {
                node_id: "local".into(),
                url: String::new(),
            },
            leases: Arc::new(SoleNodeLeases),
            lease_ttl: LEASE_TTL_DEFAULT,
            renew_period: LEASE_RENEW_PERIOD_DEFAULT,
        }
    }

    /// A node of a cluster sharing `leases`.
    ///
    /// # Panics
    /// When `renew_period` is not shorter than half of `lease_ttl` (a
    /// configuration the caller validates first).
    pub fn member(
        node: NodeAddress,
        leases: Arc<dyn LeaseStore>,
        lease_ttl: Duration,
        renew_period: Duration,
    ) -> ClusterSettings {
        assert!(
            renew_period * 2 <= lease_ttl,
            "BUG: a lease must be renewed at least twice per time to live"
        );
        ClusterSettings {
            node,
            leases,
            lease_ttl,
            renew_period,
        }
    }

    /// How much earlier than the database this node considers its lease
    /// over: covers the time a renewal takes to reach the database.
    fn safety_margin(&self) -> Duration {
        self.lease_ttl / 10
    }
}

/// What a claim told the writer.
pub(crate) enum Owned {
    /// This node holds the lease.
    Here(Arc<HeldLease>),
    /// Another node does.
    Elsewhere(NodeAddress),
}

/// A lease this node holds: its epoch and until when it is live by this
/// node's monotonic clock (which keeps running while the process is
/// stopped, so a process that wakes up finds its lease over).
#[derive(Debug)]
pub(crate) struct HeldLease {
    epoch: i64,
    /// `None`: no expiry (a sole node).
    live_until: Mutex<Option<Instant>>,
}

impl HeldLease {
    pub(crate) fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Whether the lease is live now.
    pub(crate) fn is_live(&self) -> bool {
        self.live_until
            .lock()
            .expect("BUG: lease poisoned")
            .is_none_or(|until| Instant::now() < until)
    }

    fn extend(&self, until: Instant) {
        let mut live_until = self.live_until.lock().expect("BUG: lease poisoned");
        if let Some(current) = live_until.as_mut() {
            *current = (*current).max(until);
        }
    }

    fn lapse(&self) {
        let mut live_until = self.live_until.lock().expect("BUG: lease poisoned");
        *live_until = Some(Instant::now());
    }
}

/// This node's leases and its memory of other nodes' leases.
pub(crate) struct Ownership {
    pub(crate) cluster: ClusterSettings,
    stats: Arc<EngineStats>,
    /// Products another node owns, until when that lease was seen to run.
    elsewhere: Mutex<HashMap<ProductId, (NodeAddress, Instant)>>,
    /// Products whose owner did not answer, with a claim waiting for the
    /// owner's lease to run out (at most one waiting claim per product).
    watched: Mutex<std::collections::HashSet<ProductId>>,
}

impl Ownership {
    pub(crate) fn new(cluster: ClusterSettings, stats: Arc<EngineStats>) -> Ownership {
        Ownership {
            cluster,
            stats,
            elsewhere: Mutex::new(HashMap::new()),
            watched: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// When the other node's lease on a product runs out, as last seen.
    pub(crate) fn elsewhere_until(&self, product_id: &ProductId) -> Option<Instant> {
        let elsewhere = self.elsewhere.lock().expect("BUG: owners poisoned");
        elsewhere.get(product_id).map(|(_, until)| *until)
    }

    /// Marks a product as watched; false when it already was.
    pub(crate) fn watch(&self, product_id: &ProductId) -> bool {
        let mut watched = self.watched.lock().expect("BUG: watched poisoned");
        watched.len() < OWNERS_REMEMBERED_MAX && watched.insert(product_id.clone())
    }

    /// Ends a product's watch.
    pub(crate) fn unwatch(&self, product_id: &ProductId) {
        self.watched
            .lock()
            .expect("BUG: watched poisoned")
            .remove(product_id);
    }

    /// The node that owns a product, when it is another node whose lease
    /// was live when last seen and has not run out since.
    pub(crate) fn owner_elsewhere(&self, product_id: &ProductId) -> Option<NodeAddress> {
        let mut elsewhere = self.elsewhere.lock().expect("BUG: owners poisoned");
        match elsewhere.get(product_id) {
            Some((owner, until)) if Instant::now() < *until => Some(owner.clone()),
            Some(_) => {
                elsewhere.remove(product_id);
                None
            }
            None => None,
        }
    }

    /// Forgets which other node owned a product (this node holds it now).
    pub(crate) fn forget(&self, product_id: &ProductId) {
        self.elsewhere
            .lock()
            .expect("BUG: owners poisoned")
            .remove(product_id);
    }

    fn remember(&self, product_id: &ProductId, lease: &LeaseInfo) {
        let mut elsewhere = self.elsewhere.lock().expect("BUG: owners poisoned");
        if elsewhere.len() >= OWNERS_REMEMBERED_MAX {
            let now = Instant::now();
            elsewhere.retain(|_, (_, until)| now < *until);
        }
        if elsewhere.len() < OWNERS_REMEMBERED_MAX {
            let until = Instant::now() + lease.remaining;
            elsewhere.insert(product_id.clone(), (lease.holder.clone(), until));
        }
    }

    /// Claims a product's lease for this node (a writer starting, or one
    /// whose lease lapsed).
    pub(crate) async fn claim(&self, product_id: &ProductId) -> Result<Owned, StoreError> {
        let started = Instant::now();
        let claim = self
            .cluster
            .leases
            .claim(product_id, &self.cluster.node, self.cluster.lease_ttl)
            .await?;
        match claim {
            Claim::Held(lease) => {
                self.forget(product_id);
                EngineStats::bump(&self.stats.leases_claimed);
                let live_until = (lease.remaining != Duration::MAX).then(|| {
                    started + lease.remaining.min(self.cluster.lease_ttl)
                        - self.cluster.safety_margin()
                });
                tracing::debug!(product = %product_id, epoch = lease.epoch, "lease held");
                Ok(Owned::Here(Arc::new(HeldLease {
                    epoch: lease.epoch,
                    live_until: Mutex::new(live_until),
                })))
            }
            Claim::Elsewhere(lease) => {
                EngineStats::bump(&self.stats.owner_found_elsewhere);
                self.remember(product_id, &lease);
                Ok(Owned::Elsewhere(lease.holder))
            }
        }
    }

    /// Renews a held lease every `renew_period` until the lease is lost
    /// (then marks it lapsed) or the returned guard is dropped. A lease
    /// without expiry needs no renewal.
    pub(crate) fn keep(
        self: &Arc<Self>,
        product_id: &ProductId,
        lease: &Arc<HeldLease>,
    ) -> Renewal {
        if lease
            .live_until
            .lock()
            .expect("BUG: lease poisoned")
            .is_none()
        {
            return Renewal(None);
        }
        let (ownership, product_id, lease) = (self.clone(), product_id.clone(), lease.clone());
        let task = tokio::spawn(async move {
            let cluster = &ownership.cluster;
            let mut tick = tokio::time::interval(cluster.renew_period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let started = Instant::now();
                let renewed = cluster
                    .leases
                    .renew(&product_id, &cluster.node, lease.epoch, cluster.lease_ttl)
                    .await;
                match renewed {
                    Ok(true) => lease.extend(started + cluster.lease_ttl - cluster.safety_margin()),
                    Ok(false) => {
                        tracing::warn!(product = %product_id, epoch = lease.epoch, "lease lost");
                        lease.lapse();
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(product = %product_id, %error, "could not renew the lease")
                    }
                }
            }
        });
        Renewal(Some(task.abort_handle()))
    }

    /// Ends this node's lease at once (a writer stopping for idleness).
    pub(crate) async fn release(&self, product_id: &ProductId, lease: &HeldLease) {
        let cluster = &self.cluster;
        if let Err(error) = cluster
            .leases
            .release(product_id, &cluster.node, lease.epoch)
            .await
        {
            tracing::warn!(product = %product_id, %error, "could not release the lease; it will lapse");
        }
    }
}

/// Stops a lease's renewals when dropped (with the writer that held it).
pub(crate) struct Renewal(Option<tokio::task::AbortHandle>);

impl Drop for Renewal {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}
