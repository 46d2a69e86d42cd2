//! The engine's front door: routes purchases and product commands to each
//! product's single writer, and account commands to the account book.

use crate::accounts::{AccountBook, AccountJob, JobOutcome};
use crate::clock::Clock;
use crate::context::RequestContext;
use crate::error::{CommandError, PurchaseError};
use crate::payouts::PayoutIndex;
use crate::stats::{EngineStats, StatsSnapshot};
use crate::writer::{ProductWriter, PurchaseOrder, PurchaseReceipt, SaleSnapshot, WriterMessage};
use domain::account::{AccountCommand, AccountState};
use domain::ids::validate_reference;
use domain::payout::ScheduledPayout;
use domain::product::ProductCommand;
use domain::{AccountId, Amount, OrderId, ProductId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            reservation_ttl: chrono::Duration::seconds(30),
            queue_max: 10_000,
            batch_max: 1_000,
            sweep_period: std::time::Duration::from_secs(1),
            recovery_period: std::time::Duration::from_secs(5),
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
    payout_index: Arc<tokio::sync::Mutex<PayoutIndex>>,
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
    pub fn new(
        store: Arc<dyn EventStore>,
        clock: Arc<dyn Clock>,
        settings: EngineSettings,
    ) -> Engine {
        let stats = Arc::new(EngineStats::default());
        let accounts = Arc::new(AccountBook::new(store.clone(), stats.clone()));
        Engine {
            inner: Arc::new(Inner {
                store,
                accounts,
                clock,
                settings,
                stats,
                writers: Mutex::new(HashMap::new()),
                payout_index: Arc::default(),
            }),
        }
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
        {
            let writers = self.inner.writers.lock().expect("BUG: writers poisoned");
            if writers
                .get(product_id)
                .is_some_and(|w| !w.inbox.is_closed())
            {
                return false;
            }
        }
        self.writer(product_id);
        EngineStats::bump(&self.inner.stats.recoveries_started);
        true
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

    fn writer(&self, product_id: &ProductId) -> mpsc::Sender<WriterMessage> {
        let mut writers = self.inner.writers.lock().expect("BUG: writers poisoned");
        if let Some(writer) = writers.get(product_id).filter(|w| !w.inbox.is_closed()) {
            return writer.inbox.clone();
        }
        let (inbox, receiver) = mpsc::channel(self.inner.settings.queue_max);
        let writer = ProductWriter::new(
            product_id.clone(),
            self.inner.store.clone(),
            self.inner.accounts.clone(),
            self.inner.clock.clone(),
            self.inner.settings.clone(),
            self.inner.stats.clone(),
        );
        let task = tokio::spawn(writer.run(receiver)).abort_handle();
        writers.insert(
            product_id.clone(),
            Writer {
                inbox: inbox.clone(),
                task,
            },
        );
        inbox
    }

    /// Buys `amount` of a product for an account: reserve, debit, confirm.
    /// Answers only once the outcome is durable. Retrying with the same key
    /// returns the first outcome.
    pub async fn purchase(
        &self,
        request: PurchaseRequest,
    ) -> Result<PurchaseReceipt, PurchaseError> {
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
        let (reply, answer) = oneshot::channel();
        let inbox = self.writer(&request.product_id);
        inbox
            .try_send(WriterMessage::Purchase(order, reply))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => PurchaseError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    PurchaseError::Unavailable("the product writer stopped".into())
                }
            })?;
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
        let (reply, answer) = oneshot::channel();
        self.writer(product_id)
            .send(WriterMessage::Command(command, context, reply))
            .await
            .map_err(|_| CommandError::ShuttingDown)?;
        answer.await.map_err(|_| CommandError::ShuttingDown)?
    }

    /// The product's sale as its writer holds it (`None`: not listed).
    pub async fn sale(&self, product_id: &ProductId) -> Result<Option<SaleSnapshot>, CommandError> {
        let (reply, answer) = oneshot::channel();
        self.writer(product_id)
            .send(WriterMessage::Snapshot(reply))
            .await
            .map_err(|_| CommandError::ShuttingDown)?;
        answer.await.map_err(|_| CommandError::ShuttingDown)
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
