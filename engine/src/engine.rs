//! The engine's front door: routes purchases and product commands to each
//! product's single writer, and account commands to the account book.

use crate::accounts::{AccountBook, AccountJob, JobOutcome};
use crate::clock::Clock;
use crate::context::RequestContext;
use crate::error::{CommandError, PurchaseError};
use crate::ownership::{ClusterSettings, Ownership};
use crate::payouts::PayoutIndex;
use crate::stats::{EngineStats, StatsSnapshot};
use crate::writer::{
    Placed, ProductWriter, PurchaseOrder, PurchaseReceipt, SaleSnapshot, WriterMessage,
};
use domain::account::{AccountCommand, AccountState};
use domain::ids::validate_reference;
use domain::payout::ScheduledPayout;
use domain::product::ProductCommand;
use domain::{AccountId, Amount, OrderId, ProductId};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use store::lease::NodeAddress;
use store::{Appended, EventStore, StoreError};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Namespace of order ids derived from (account, idempotency key).
const ORDER_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_2d6f_7264_6572_2d69_6473);

/// Tunable limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// How long a reservation waits for its payment.
    pub reservation_ttl: chrono::Duration,
    /// Purchases queued per product before new ones are shed (`Overloaded`).
    pub queue_max: usize,
    /// Most messages a writer takes into one batch.
    pub batch_max: usize,
    /// How often a writer looks for expired reservations.
    pub sweep_period: std::time::Duration,
    /// How often the recovery sweep (`recovery::run`) looks for products
    /// with orders left in flight and no writer.
    pub recovery_period: std::time::Duration,
    /// How long a writer with nothing pending waits for work before it
    /// stops (it starts again on the product's next command).
    pub writer_idle_stop: std::time::Duration,
}

/// Product ids found to name no product, remembered so a flood of one
/// made-up id costs one store read per `UNKNOWN_PRODUCT_TTL`.
pub const UNKNOWN_PRODUCTS_MAX: u64 = 10_000;
/// How long a product id found unlisted is believed unlisted (a listing on
/// another node is seen after at most this long).
pub const UNKNOWN_PRODUCT_TTL: std::time::Duration = std::time::Duration::from_secs(1);

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            reservation_ttl: chrono::Duration::seconds(30),
            queue_max: 10_000,
            batch_max: 1_000,
            sweep_period: std::time::Duration::from_secs(1),
            recovery_period: std::time::Duration::from_secs(5),
            writer_idle_stop: std::time::Duration::from_secs(60),
        }
    }
}

/// A purchase as a caller asks for it.
#[derive(Debug, Clone)]
pub struct PurchaseRequest {
    /// The product.
    pub product_id: ProductId,
    /// The buyer.
    pub account_id: AccountId,
    /// Units wanted.
    pub amount: Amount,
    /// The caller's key; with the account it fixes the order id, so a retry
    /// never buys twice.
    pub idempotency_key: String,
    /// Who asked.
    pub context: RequestContext,
}

/// The order id a purchase with this key gets: the same on every retry,
/// across restarts and processes; the same key on another product is
/// another order.
pub fn order_id_for(
    product_id: &ProductId,
    account_id: AccountId,
    idempotency_key: &str,
) -> OrderId {
    let name = format!("{product_id}/{account_id}/{idempotency_key}");
    OrderId(Uuid::new_v5(&ORDER_NAMESPACE, name.as_bytes()))
}

/// The command side of the ledger.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn EventStore>,
    accounts: Arc<AccountBook>,
    clock: Arc<dyn Clock>,
    settings: EngineSettings,
    stats: Arc<EngineStats>,
    writers: Mutex<HashMap<ProductId, Writer>>,
    /// Products found listed in the log (only real products: bounded).
    listed: Mutex<HashSet<ProductId>>,
    /// Product ids found unlisted lately (bounded).
    unlisted: moka::sync::Cache<ProductId, ()>,
    payout_index: Arc<tokio::sync::Mutex<PayoutIndex>>,
    /// Which products this node owns, and who owns the others.
    ownership: Arc<Ownership>,
}

struct Writer {
    inbox: mpsc::Sender<WriterMessage>,
    task: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for writer in self
            .writers
            .get_mut()
            .expect("BUG: writers poisoned")
            .values()
        {
            writer.task.abort();
        }
    }
}

impl Engine {
    /// An engine over a store; writers start on first use of a product.
    /// It owns every product (a node alone; other processes on the same log
    /// are fenced by the stream's expected version).
    pub fn new(
        store: Arc<dyn EventStore>,
        clock: Arc<dyn Clock>,
        settings: EngineSettings,
    ) -> Engine {
        Engine::with_cluster(store, clock, settings, ClusterSettings::sole_node())
    }

    /// An engine that runs a product's writer only while it holds the
    /// product's lease in `cluster`; for products another node owns,
    /// purchases and commands answer `NotOwner` with that node.
    pub fn with_cluster(
        store: Arc<dyn EventStore>,
        clock: Arc<dyn Clock>,
        settings: EngineSettings,
        cluster: ClusterSettings,
    ) -> Engine {
        let stats = Arc::new(EngineStats::default());
        let ownership = Arc::new(Ownership::new(cluster, stats.clone()));
        let accounts = Arc::new(AccountBook::new(store.clone(), stats.clone()));
        Engine {
            inner: Arc::new(Inner {
                store,
                accounts,
                clock,
                settings,
                stats,
                writers: Mutex::new(HashMap::new()),
                listed: Mutex::new(HashSet::new()),
                unlisted: moka::sync::Cache::builder()
                    .max_capacity(UNKNOWN_PRODUCTS_MAX)
                    .time_to_live(UNKNOWN_PRODUCT_TTL)
                    .build(),
                payout_index: Arc::default(),
                ownership,
            }),
        }
    }

    /// This node, as product leases name it.
    pub fn node(&self) -> &NodeAddress {
        &self.inner.ownership.cluster.node
    }

    /// The node owning a product when it is another node whose lease was
    /// live when last read (from memory, no database round trip).
    pub fn owner_elsewhere(&self, product_id: &ProductId) -> Option<NodeAddress> {
        self.inner.ownership.owner_elsewhere(product_id)
    }

    /// The product's owner did not answer (dead, or stopped): claims the
    /// product's lease as soon as the owner's lease runs out, without
    /// waiting for a request, so its pending reservations are resumed and
    /// buyers' retries find a live owner. The claim may find that the owner
    /// renewed after all; then nothing changes. One watch per product.
    pub fn claim_when_lapsed(&self, product_id: &ProductId) {
        let ownership = &self.inner.ownership;
        if !ownership.watch(product_id) {
            return;
        }
        let (engine, product_id) = (self.clone(), product_id.clone());
        tokio::spawn(async move {
            let ownership = &engine.inner.ownership;
            while let Some(until) = ownership.elsewhere_until(&product_id) {
                tokio::time::sleep_until(until).await;
                if ownership.owner_elsewhere(&product_id).is_none() {
                    break;
                }
            }
            engine.recover(&product_id);
            ownership.unwatch(&product_id);
        });
    }

    /// What the engine has done so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// The engine's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.inner.clock.now()
    }

    /// Starts a product's writer if none runs in this process, so it loads
    /// the product and repairs what a crash left (pending reservations,
    /// refunds owed) without waiting for a request. Returns whether a writer
    /// was started.
    pub fn recover(&self, product_id: &ProductId) -> bool {
        if self.running_writer(product_id).is_some() {
            return false;
        }
        if self.writer(product_id).is_err() {
            return false; // Another node owns it and recovers it.
        }
        EngineStats::bump(&self.inner.stats.recoveries_started);
        true
    }

    /// The inbox of the product's writer running in this process, if any.
    fn running_writer(&self, product_id: &ProductId) -> Option<mpsc::Sender<WriterMessage>> {
        let writers = self.inner.writers.lock().expect("BUG: writers poisoned");
        writers
            .get(product_id)
            .filter(|w| !w.inbox.is_closed())
            .map(|w| w.inbox.clone())
    }

    /// Has a product's writer refund orders it released whose buyer was
    /// debited after all (a former owner's late debit): tells the writer
    /// running here, or starts one (which checks every released order as it
    /// loads). Returns whether a writer here took the work.
    pub fn refund_strays(&self, product_id: &ProductId, orders: Vec<(OrderId, AccountId)>) -> bool {
        match self.running_writer(product_id) {
            Some(inbox) => inbox.try_send(WriterMessage::RefundStrays(orders)).is_ok(),
            None => self.recover(product_id),
        }
    }

    /// The payouts with work left, followed from the log: one index per
    /// engine, shared by this node's payout workers.
    pub fn payout_index(&self) -> Arc<tokio::sync::Mutex<PayoutIndex>> {
        self.inner.payout_index.clone()
    }

    /// Credits succeeded payouts to their holders in batched multi-stream
    /// appends (idempotent on the payout id); one outcome per payout, in
    /// order.
    pub async fn credit_payouts(
        &self,
        payouts: &[ScheduledPayout],
        context: &RequestContext,
    ) -> Vec<JobOutcome> {
        let jobs = payouts
            .iter()
            .map(|payout| AccountJob {
                account_id: payout.account_id,
                command: AccountCommand::CreditPayout {
                    payout_id: payout.payout_id,
                    product_id: payout.product_id.clone(),
                    kind: payout.kind,
                    amount: payout.amount,
                },
                correlation_id: None,
                context: context.clone(),
            })
            .collect();
        self.inner
            .accounts
            .execute_batch(jobs, self.inner.clock.now())
            .await
            .into_iter()
            .map(|(outcome, _)| outcome)
            .collect()
    }

    /// Counts a payout a worker parked (for metrics).
    pub fn note_payout_parked(&self) {
        EngineStats::bump(&self.inner.stats.payouts_parked);
    }

    /// Purchases queued per product and not yet taken by its writer (for
    /// metrics: a queue near `queue_max` is about to shed load).
    pub fn queue_depths(&self) -> Vec<(ProductId, usize)> {
        let writers = self.inner.writers.lock().expect("BUG: writers poisoned");
        writers
            .iter()
            .filter(|(_, writer)| !writer.inbox.is_closed())
            .map(|(product_id, writer)| {
                let depth = writer.inbox.max_capacity() - writer.inbox.capacity();
                (product_id.clone(), depth)
            })
            .collect()
    }

    /// Stops every writer at once, as a crash would: queued work is dropped,
    /// committed work stays. Callers still waiting get `Unavailable`.
    pub fn halt(&self) {
        let mut writers = self.inner.writers.lock().expect("BUG: writers poisoned");
        for (_, writer) in writers.drain() {
            writer.task.abort();
        }
    }

    /// The inbox of the product's writer, started if needed; the owner
    /// when another node holds the product's lease (as last seen).
    fn writer(&self, product_id: &ProductId) -> Result<mpsc::Sender<WriterMessage>, NodeAddress> {
        let mut writers = self.inner.writers.lock().expect("BUG: writers poisoned");
        if let Some(writer) = writers.get(product_id).filter(|w| !w.inbox.is_closed()) {
            return Ok(writer.inbox.clone());
        }
        if let Some(owner) = self.inner.ownership.owner_elsewhere(product_id) {
            return Err(owner);
        }
        // Writers that stopped for idleness are forgotten here, so the map
        // holds at most the products in use.
        writers.retain(|_, writer| !writer.inbox.is_closed());
        let (inbox, receiver) = mpsc::channel(self.inner.settings.queue_max);
        let writer = ProductWriter::new(
            product_id.clone(),
            self.inner.store.clone(),
            self.inner.accounts.clone(),
            self.inner.clock.clone(),
            self.inner.settings.clone(),
            self.inner.stats.clone(),
            self.inner.ownership.clone(),
        );
        let task = tokio::spawn(writer.run(receiver)).abort_handle();
        writers.insert(
            product_id.clone(),
            Writer {
                inbox: inbox.clone(),
                task,
            },
        );
        Ok(inbox)
    }

    /// Whether a product is listed: known here, or found in the log (one
    /// read of its stream's first event, remembered either way). Nothing is
    /// started for a product that is not listed.
    pub async fn is_listed(&self, product_id: &ProductId) -> Result<bool, StoreError> {
        if self
            .inner
            .listed
            .lock()
            .expect("BUG: listed products poisoned")
            .contains(product_id)
        {
            return Ok(true);
        }
        if self.inner.unlisted.contains_key(product_id) {
            return Ok(false);
        }
        let first = self
            .inner
            .store
            .read_stream(&product_id.stream(), 0, 1)
            .await?;
        if first.is_empty() {
            self.inner.unlisted.insert(product_id.clone(), ());
            return Ok(false);
        }
        self.know(product_id);
        Ok(true)
    }

    fn know(&self, product_id: &ProductId) {
        self.inner.unlisted.invalidate(product_id);
        self.inner
            .listed
            .lock()
            .expect("BUG: listed products poisoned")
            .insert(product_id.clone());
    }

    /// Queues a purchase for its product's writer at once, or sheds it; a
    /// writer that stopped for idleness meanwhile is replaced, once.
    fn try_send(
        &self,
        product_id: &ProductId,
        message: WriterMessage,
    ) -> Result<(), PurchaseError> {
        let sent = match self
            .writer(product_id)
            .map_err(PurchaseError::NotOwner)?
            .try_send(message)
        {
            Err(mpsc::error::TrySendError::Closed(message)) => self
                .writer(product_id)
                .map_err(PurchaseError::NotOwner)?
                .try_send(message),
            other => other,
        };
        sent.map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => PurchaseError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => {
                PurchaseError::Unavailable("the product writer stopped".into())
            }
        })
    }

    /// Sends a message to a product's writer, waiting for room in the
    /// queue; a writer that stopped for idleness meanwhile is replaced, once.
    async fn send(
        &self,
        product_id: &ProductId,
        message: WriterMessage,
    ) -> Result<(), CommandError> {
        let writer = self.writer(product_id).map_err(CommandError::NotOwner)?;
        match writer.send(message).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(message)) => self
                .writer(product_id)
                .map_err(CommandError::NotOwner)?
                .send(message)
                .await
                .map_err(|_| CommandError::ShuttingDown),
        }
    }

    /// Buys `amount` of a product for an account: reserve, debit, confirm.
    /// Answers only once the outcome is durable. Retrying with the same key
    /// returns the first outcome.
    pub async fn purchase(
        &self,
        request: PurchaseRequest,
    ) -> Result<PurchaseReceipt, PurchaseError> {
        self.place(request).await.map(|placed| placed.receipt)
    }

    /// Like `purchase`, with a log position at or after the confirmation
    /// (for a caller that reads its own write).
    pub async fn place(&self, request: PurchaseRequest) -> Result<Placed, PurchaseError> {
        validate_reference(&request.idempotency_key).map_err(|_| {
            PurchaseError::Invalid("idempotency key must be 1 to 128 printable characters".into())
        })?;
        if request.amount.is_zero() {
            return Err(PurchaseError::Invalid("amount must be positive".into()));
        }
        let order = PurchaseOrder {
            order_id: order_id_for(
                &request.product_id,
                request.account_id,
                &request.idempotency_key,
            ),
            account_id: request.account_id,
            amount: request.amount,
            context: request.context,
        };
        let listed = self
            .is_listed(&request.product_id)
            .await
            .map_err(|error| PurchaseError::Unavailable(error.to_string()))?;
        if !listed {
            return Err(PurchaseError::UnknownProduct);
        }
        let (reply, answer) = oneshot::channel();
        self.try_send(&request.product_id, WriterMessage::Purchase(order, reply))?;
        answer.await.unwrap_or_else(|_| {
            Err(PurchaseError::Unavailable(
                "the product writer stopped".into(),
            ))
        })
    }

    /// Lists, opens, closes a product, or releases a reservation; `None`
    /// when the command was already satisfied.
    pub async fn product_command(
        &self,
        product_id: &ProductId,
        command: ProductCommand,
        context: RequestContext,
    ) -> Result<Option<Appended>, CommandError> {
        // Reservations are made and settled only by the purchase workflow,
        // which also takes the money; an operator may only cancel one.
        if !matches!(
            command,
            ProductCommand::List { .. }
                | ProductCommand::Open
                | ProductCommand::Close
                | ProductCommand::Release { .. }
        ) {
            return Err(CommandError::NotAllowed(
                "reservations are made and settled by purchases",
            ));
        }
        // Listing makes a product known; every other command needs one.
        let listing = matches!(command, ProductCommand::List { .. });
        if !listing && !self.is_listed(product_id).await? {
            return Err(CommandError::Product(
                domain::product::ProductRejection::NotListed,
            ));
        }
        let (reply, answer) = oneshot::channel();
        self.send(product_id, WriterMessage::Command(command, context, reply))
            .await?;
        let outcome = answer.await.map_err(|_| CommandError::ShuttingDown)?;
        if listing && outcome.is_ok() {
            self.know(product_id);
        }
        outcome
    }

    /// The product's sale as its writer holds it (`None`: not listed).
    pub async fn sale(&self, product_id: &ProductId) -> Result<Option<SaleSnapshot>, CommandError> {
        if !self.is_listed(product_id).await? {
            return Ok(None);
        }
        let (reply, answer) = oneshot::channel();
        self.send(product_id, WriterMessage::Snapshot(reply))
            .await?;
        answer.await.map_err(|_| CommandError::ShuttingDown)?
    }

    /// Opens an account, deposits, withdraws...; `None` when already satisfied.
    pub async fn account_command(
        &self,
        account_id: AccountId,
        command: AccountCommand,
        context: RequestContext,
    ) -> Result<Option<Appended>, CommandError> {
        let job = AccountJob {
            account_id,
            command,
            correlation_id: None,
            context,
        };
        self.inner
            .accounts
            .execute(job, self.inner.clock.now())
            .await
    }

    /// An account's current state and version, read through the book.
    pub async fn account(&self, account_id: AccountId) -> Result<(AccountState, i64), StoreError> {
        self.inner.accounts.state(account_id).await
    }
}
