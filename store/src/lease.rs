//! Product leases: which node runs a product's writer across a cluster.
//!
//! A lease names one node (its id and the URL other nodes forward to), an
//! epoch and an expiry. It is taken, renewed and released by single
//! conditional statements on PostgreSQL, timed by the database's clock. A
//! lease is routing and liveness, not the fence: the product stream's
//! expected version still refuses a writer that decided on a stale state.
//! With one node (SQLite, or no cluster configured) [`SoleNodeLeases`]
//! grants every lease to the local node through the same trait.

use crate::StoreError;
use async_trait::async_trait;
use domain::ProductId;
use sqlx::PgPool;
use std::time::Duration;

/// A node of the cluster, as leases name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    /// The node's id (unique among the nodes on one database).
    pub node_id: String,
    /// Its base URL (`http://host:port`), where other nodes forward to.
    pub url: String,
}

/// A lease as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The holder.
    pub holder: NodeAddress,
    /// Grows each time the lease is granted anew.
    pub epoch: i64,
    /// How long it still runs, by the database's clock (zero once lapsed).
    pub remaining: Duration,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The lease is the claimant's (new, taken over, or still its own).
    Held(LeaseInfo),
    /// Another node holds a live lease.
    Elsewhere(LeaseInfo),
}

/// Where product leases live.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes the product's lease for `node` for `ttl` if it is free, lapsed
    /// or already `node`'s (keeping its epoch then); otherwise names the
    /// holder.
    async fn claim(
        &self,
        product_id: &ProductId,
        node: &NodeAddress,
        ttl: Duration,
    ) -> Result<Claim, StoreError>;

    /// Extends `node`'s live lease of this epoch by `ttl` from now; false
    /// when it lapsed or passed to another epoch (the lease is lost).
    async fn renew(
        &self,
        product_id: &ProductId,
        node: &NodeAddress,
        epoch: i64,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Ends `node`'s lease of this epoch at once, so another node may take
    /// it without waiting for it to lapse.
    async fn release(
        &self,
        product_id: &ProductId,
        node: &NodeAddress,
        epoch: i64,
    ) -> Result<(), StoreError>;
}

/// One node: every lease is the local node's, for ever (SQLite, or a
/// PostgreSQL node that takes no part in a cluster; other processes are
/// then fenced by the stream's expected version alone).
#[derive(Debug, Clone, Copy, Default)]
pub struct SoleNodeLeases;

/// The epoch of every lease a sole node holds.
pub const SOLE_NODE_EPOCH: i64 = 1;

#[async_trait]
impl LeaseStore for SoleNodeLeases {
    async fn claim(
        &self,
        _product_id: &ProductId,
        node: &NodeAddress,
        _ttl: Duration,
    ) -> Result<Claim, StoreError> {
        Ok(Claim::Held(LeaseInfo {
            holder: node.clone(),
            epoch: SOLE_NODE_EPOCH,
            remaining: Duration::MAX,
        }))
    }

    async fn renew(
        &self,
        _product_id: &ProductId,
        _node: &NodeAddress,
        epoch: i64,
        _ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(epoch == SOLE_NODE_EPOCH)
    }

    async fn release(
        &self,
        _product_id: &ProductId,
        _node: &NodeAddress,
        _epoch: i64,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Leases in PostgreSQL's `product_leases` table (migration 0007).
#[derive(Clone)]
pub struct PostgresLeases {
    pool: PgPool,
}

/// Takes a free, lapsed or own lease in one statement: the row lock of
/// `ON CONFLICT DO UPDATE` makes concurrent claims of one product take
/// turns, and the `WHERE` lets only one of them win a live lease.
const CLAIM: &str = "INSERT INTO product_leases AS l (product_id, node_id, url, epoch, expires_at) \
     VALUES ($1, $2, $3, 1, now() + make_interval(secs => $4)) \
     ON CONFLICT (product_id) DO UPDATE SET \
       node_id = EXCLUDED.node_id, url = EXCLUDED.url, \
       epoch = CASE WHEN l.node_id = EXCLUDED.node_id AND l.expires_at > now() \
               THEN l.epoch ELSE l.epoch + 1 END, \
       expires_at = EXCLUDED.expires_at \
     WHERE l.node_id = EXCLUDED.node_id OR l.expires_at <= now() \
     RETURNING node_id, url, epoch, \
       GREATEST(0, (EXTRACT(EPOCH FROM (expires_at - now())) * 1000))::BIGINT";

/// The holder of a lease the claim could not take.
const HOLDER: &str = "SELECT node_id, url, epoch, \
       GREATEST(0, (EXTRACT(EPOCH FROM (expires_at - now())) * 1000))::BIGINT \
     FROM product_leases WHERE product_id = $1";

const RENEW: &str = "UPDATE product_leases SET expires_at = now() + make_interval(secs => $4) \
     WHERE product_id = $1 AND node_id = $2 AND epoch = $3 AND expires_at > now()";

const RELEASE: &str = "UPDATE product_leases SET expires_at = now() \
     WHERE product_id = $1 AND node_id = $2 AND epoch = $3 AND expires_at > now()";

type LeaseRow = (String, String, i64, i64);

fn lease_info((node_id, url, epoch, remaining_ms): LeaseRow) -> LeaseInfo {
    LeaseInfo {
        holder: NodeAddress { node_id, url },
        epoch,
        remaining: Duration::from_millis(u64::try_from(remaining_ms).unwrap_or(0)),
    }
}

impl PostgresLeases {
    /// Leases kept in this pool's database (migrated by the event store).
    pub fn new(pool: PgPool) -> PostgresLeases {
        PostgresLeases { pool }
    }
}

#[async_trait]
impl LeaseStore for PostgresLeases {
    async fn claim(
        &self,
        product_id: &ProductId,
        node: &NodeAddress,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let taken: Option<LeaseRow> = sqlx::query_as(CLAIM)
            .bind(product_id.as_str())
            .bind(&node.node_id)
            .bind(&node.url)
            .bind(ttl.as_secs_f64())
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = taken {
            return Ok(Claim::Held(lease_info(row)));
        }
        let holder: Option<LeaseRow> = sqlx::query_as(HOLDER)
            .bind(product_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        let holder = holder.expect("BUG: a claim that took nothing found a lease row");
        Ok(Claim::Elsewhere(lease_info(holder)))
    }

    async fn renew(
        &self,
        product_id: &ProductId,
        node: &NodeAddress,
        epoch: i64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(RENEW)
            .bind(product_id.as_str())
            .bind(&node.node_id)
            .bind(epoch)
            .bind(ttl.as_secs_f64())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release(
        &self,
        product_id: &ProductId,
        node: &NodeAddress,
        epoch: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(RELEASE)
            .bind(product_id.as_str())
            .bind(&node.node_id)
            .bind(epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
