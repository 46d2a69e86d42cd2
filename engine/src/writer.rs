//! The product writer: one task per active product owns the product's state
//! in memory and is the only one in this process that writes its stream.
//!
//! Each loop turn drains up to `batch_max` queued messages and makes one
//! product append holding (a) the confirmations and releases decided for the
//! previous turn's reservations and (b) the reservations or refusals of the
//! new purchases. It then debits the new reservations' buyers in one batched
//! multi-stream append. So a purchase costs a share of two commits, and no
//! reply leaves before the events behind it are committed. The expected
//! stream version fences any other process writing the same product: on a
//! conflict the writer reloads the stream and decides again.

use crate::EngineSettings;
use crate::accounts::{AccountBook, AccountJob, JobOutcome};
use crate::aggregate::{Loaded, encode_all, expected_after};
use crate::clock::Clock;
use crate::context::RequestContext;
use crate::error::{CommandError, PurchaseError};
use crate::ownership::{HeldLease, Owned, Ownership, Renewal};
use crate::stats::EngineStats;
use domain::account::{AccountCommand, AccountRejection};
use domain::product::{
    ProductCommand, ProductEvent, ProductRejection, ProductSale, ProductState, RefusalReason,
    ReleaseReason, ReservationState, Sale, SaleStatus,
};
use domain::{AccountId, Amount, Decider, OrderId, ProductId};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use store::lease::NodeAddress;
use store::{Appended, EventStore, NewEvent, StoreError};
use tokio::sync::{mpsc, oneshot};

/// Pause after a store failure before the writer tries again.
const STORE_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Most decide-and-append rounds for one batch before its purchases are
/// answered `Unavailable` (they may be retried with the same key).
pub const PRODUCT_ROUNDS_MAX: usize = 16;

/// A confirmed purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseReceipt {
    /// The order.
    pub order_id: OrderId,
    /// The product bought.
    pub product_id: ProductId,
    /// The buyer.
    pub account_id: AccountId,
    /// Units bought.
    pub amount: Amount,
}

/// A confirmed purchase and where it can be seen: a log position at or
/// after the order's confirmation (once the read models reach it, they show
/// the purchase). The position is an observation, not part of the outcome:
/// a retry answers the same receipt, possibly with a later position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The outcome.
    pub receipt: PurchaseReceipt,
    /// The writer's last known position of its product stream, at or after
    /// the confirmation.
    pub visible_at: i64,
}

/// A product's sale as the writer holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleSnapshot {
    /// Total quota.
    pub quota: Amount,
    /// Confirmed units.
    pub confirmed: Amount,
    /// Pending units.
    pub pending: Amount,
    /// Units neither pending nor confirmed.
    pub available: Amount,
    /// Confirmed orders.
    pub confirmed_orders: u64,
    /// Display status.
    pub status: SaleStatus,
    /// The product stream's version.
    pub version: i64,
}

pub(crate) type PurchaseReply = oneshot::Sender<Result<Placed, PurchaseError>>;

/// A purchase as queued for the writer.
#[derive(Debug)]
pub(crate) struct PurchaseOrder {
    pub order_id: OrderId,
    pub account_id: AccountId,
    pub amount: Amount,
    pub context: RequestContext,
}

/// What a writer is asked.
pub(crate) enum WriterMessage {
    Purchase(PurchaseOrder, PurchaseReply),
    Command(
        ProductCommand,
        RequestContext,
        oneshot::Sender<Result<Option<Appended>, CommandError>>,
    ),
    Snapshot(oneshot::Sender<Result<Option<SaleSnapshot>, CommandError>>),
    /// Orders this product released whose buyer was debited after all (a
    /// former owner's debit that landed late), found by the recovery sweep:
    /// refund those still paid.
    RefundStrays(Vec<(OrderId, AccountId)>),
}

#[derive(Debug, Clone, Copy)]
enum Settlement {
    Confirm,
    Release(ReleaseReason),
}

enum Known {
    Answer(Result<Placed, PurchaseError>),
    Pending,
}

pub(crate) struct ProductWriter {
    product_id: ProductId,
    stream: String,
    store: Arc<dyn EventStore>,
    accounts: Arc<AccountBook>,
    clock: Arc<dyn Clock>,
    settings: EngineSettings,
    stats: Arc<EngineStats>,
    product: Loaded<ProductState>,
    /// The in-memory state may not match the store (a failed append): reload first.
    stale: bool,
    /// Events evolved into the state and not yet appended: while any is,
    /// no answer may be read from the state (a reply is a promise that its
    /// events are durable).
    undurable: usize,
    /// Whether released orders were checked for payments still held (once per writer).
    scanned_released: bool,
    waiters: HashMap<OrderId, Vec<PurchaseReply>>,
    contexts: HashMap<OrderId, RequestContext>,
    to_debit: Vec<OrderId>,
    to_settle: Vec<(OrderId, Settlement)>,
    to_refund: Vec<OrderId>,
    ownership: Arc<Ownership>,
    /// The product's lease while this writer holds it, and its renewals.
    lease: Option<(Arc<HeldLease>, Renewal)>,
}

/// Why a writer's loop ended.
enum Ended {
    /// Every sender is gone, or it stopped for idleness.
    Done,
    /// Another node holds the product's lease.
    NotOwner(NodeAddress),
}

/// Whether a writer may decide.
enum LeaseCheck {
    /// It holds a live lease.
    Live,
    /// Another node holds the lease.
    Lost(NodeAddress),
    /// The lease could not be read; nothing is decided this turn.
    Unknown,
}

impl ProductWriter {
    pub(crate) fn new(
        product_id: ProductId,
        store: Arc<dyn EventStore>,
        accounts: Arc<AccountBook>,
        clock: Arc<dyn Clock>,
        settings: EngineSettings,
        stats: Arc<EngineStats>,
        ownership: Arc<Ownership>,
    ) -> ProductWriter {
        ProductWriter {
            stream: product_id.stream(),
            product_id,
            store,
            accounts,
            clock,
            settings,
            stats,
            product: Loaded::default(),
            stale: true,
            undurable: 0,
            scanned_released: false,
            waiters: HashMap::new(),
            contexts: HashMap::new(),
            to_debit: Vec::new(),
            to_settle: Vec::new(),
            to_refund: Vec::new(),
            ownership,
            lease: None,
        }
    }

    /// The writer's loop; ends when every sender is gone, or once it had
    /// nothing to do for `writer_idle_stop` (it then closes its inbox,
    /// answers what was already queued, and ends; the engine starts a new
    /// writer for the next command).
    pub(crate) async fn run(mut self, mut inbox: mpsc::Receiver<WriterMessage>) {
        match self.serve(&mut inbox).await {
            Ended::Done => {
                if let Some((lease, renewal)) = self.lease.take() {
                    drop(renewal);
                    self.ownership.release(&self.product_id, &lease).await;
                }
            }
            Ended::NotOwner(owner) => {
                // Nothing more is decided here: queued callers and those
                // waiting for pending orders ask the owner (their orders'
                // ids make that safe), which resumes what was left.
                inbox.close();
                let mut messages = Vec::new();
                while let Ok(message) = inbox.try_recv() {
                    messages.push(message);
                }
                refuse_all(messages, &owner);
                for (_, replies) in self.waiters.drain() {
                    for reply in replies {
                        let _ = reply.send(Err(PurchaseError::NotOwner(owner.clone())));
                    }
                }
            }
        }
    }

    /// Checks the writer's lease before a turn: claims it when it has none
    /// or it lapsed; a lease granted anew (a new epoch) means another node
    /// may have written meanwhile, so the product is reloaded first.
    async fn check_lease(&mut self) -> LeaseCheck {
        if self
            .lease
            .as_ref()
            .is_some_and(|(lease, _)| lease.is_live())
        {
            return LeaseCheck::Live;
        }
        let previous = self.lease.take().map(|(lease, _)| lease.epoch());
        match self.ownership.claim(&self.product_id).await {
            Ok(Owned::Here(lease)) => {
                if previous.is_some_and(|epoch| epoch != lease.epoch()) {
                    self.stale = true;
                }
                let renewal = self.ownership.keep(&self.product_id, &lease);
                self.lease = Some((lease, renewal));
                LeaseCheck::Live
            }
            Ok(Owned::Elsewhere(owner)) => {
                if previous.is_some() {
                    EngineStats::bump(&self.stats.leases_lost);
                    tracing::warn!(product = %self.product_id, owner = %owner.node_id, "lease taken by another node; writer stopping");
                }
                LeaseCheck::Lost(owner)
            }
            Err(error) => {
                tracing::warn!(product = %self.product_id, %error, "could not claim the product's lease");
                LeaseCheck::Unknown
            }
        }
    }

    /// Whether the writer's lease is live now (checked again right before
    /// each append: a process stopped mid-turn wakes up to a lapsed lease).
    fn lease_live(&self) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|(lease, _)| lease.is_live())
    }

    async fn serve(&mut self, inbox: &mut mpsc::Receiver<WriterMessage>) -> Ended {
        let mut sweep = tokio::time::interval(self.settings.sweep_period);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_work = tokio::time::Instant::now();
        let mut closing = false;
        loop {
            let mut messages = Vec::new();
            if self.idle() {
                let stop_at = last_work + self.settings.writer_idle_stop;
                let may_stop = !closing && self.may_stop();
                tokio::select! {
                    biased;
                    message = inbox.recv() => match message {
                        Some(message) => messages.push(message),
                        None => return Ended::Done,
                    },
                    _ = sweep.tick() => self.sweep_expired(),
                    () = tokio::time::sleep_until(stop_at), if may_stop => {
                        tracing::debug!(product = %self.product_id, "idle writer stopping");
                        inbox.close();
                        closing = true;
                        continue;
                    }
                }
            }
            if !messages.is_empty() || !self.idle() {
                last_work = tokio::time::Instant::now();
            }
            while messages.len() < self.settings.batch_max {
                match inbox.try_recv() {
                    Ok(message) => messages.push(message),
                    Err(_) => break,
                }
            }
            match self.check_lease().await {
                LeaseCheck::Live => self.turn(messages).await,
                LeaseCheck::Lost(owner) => {
                    refuse_all(messages, &owner);
                    return Ended::NotOwner(owner);
                }
                LeaseCheck::Unknown => {
                    fail_all(messages, "the product's lease could not be read");
                    tokio::time::sleep(STORE_RETRY_PAUSE).await;
                }
            }
        }
    }

    fn idle(&self) -> bool {
        !self.stale
            && self.to_debit.is_empty()
            && self.to_settle.is_empty()
            && self.to_refund.is_empty()
    }

    /// Whether stopping loses nothing: no reservation pending (the sweep
    /// must see it expire) and nobody waiting for an answer.
    fn may_stop(&self) -> bool {
        self.waiters.is_empty() && self.sale().is_none_or(|sale| sale.pending.is_zero())
    }

    fn sale(&self) -> Option<&Sale> {
        self.product.state.sale.as_ref()
    }

    /// One turn: answer what memory can, append the product batch, debit, refund.
    async fn turn(&mut self, messages: Vec<WriterMessage>) {
        if self.stale && !self.reload().await {
            fail_all(messages, "the event store is unavailable");
            tokio::time::sleep(STORE_RETRY_PAUSE).await;
            return;
        }
        let mut purchases = Vec::new();
        for message in messages {
            // A command's failed append may have left the state ahead of the
            // store: read it again before answering anything from it.
            if self.stale && matches!(message, WriterMessage::Purchase(..)) && !self.reload().await
            {
                fail_all(vec![message], "the event store is unavailable");
                continue;
            }
            match message {
                WriterMessage::Purchase(order, reply) => match self.known(&order) {
                    Some(Known::Answer(answer)) => {
                        self.assert_durable();
                        let _ = reply.send(answer);
                    }
                    Some(Known::Pending) => {
                        self.waiters.entry(order.order_id).or_default().push(reply)
                    }
                    None => purchases.push((order, reply)),
                },
                WriterMessage::Command(command, context, reply) => {
                    // Order of arrival is order of decision: purchases queued
                    // before this command (a close, say) are decided first.
                    if !purchases.is_empty() {
                        self.append_batch(std::mem::take(&mut purchases)).await;
                    }
                    let _ = reply.send(self.execute(command, context).await);
                }
                WriterMessage::Snapshot(reply) => {
                    let _ = reply.send(Ok(self.snapshot()));
                }
                WriterMessage::RefundStrays(orders) => {
                    if let Err(error) = self.queue_stray_refunds(orders).await {
                        tracing::warn!(product = %self.product_id, %error, "stray refunds not checked; the sweep asks again");
                    }
                }
            }
        }
        let (purchase_count, settle_count) = (purchases.len(), self.to_settle.len());
        let started = std::time::Instant::now();
        if !purchases.is_empty() || !self.to_settle.is_empty() {
            self.append_batch(purchases).await;
        }
        let appended = started.elapsed();
        let debit_count = self.to_debit.len();
        if !self.to_debit.is_empty() {
            self.debit().await;
        }
        let debited = started.elapsed();
        if !self.to_refund.is_empty() {
            self.refund().await;
        }
        tracing::debug!(
            product = %self.product_id,
            purchases = purchase_count,
            settlements = settle_count,
            debits = debit_count,
            product_append_ms = appended.as_secs_f64() * 1e3,
            debit_ms = (debited - appended).as_secs_f64() * 1e3,
            "writer turn"
        );
    }

    fn snapshot(&self) -> Option<SaleSnapshot> {
        let sale = self.sale()?;
        Some(SaleSnapshot {
            quota: sale.terms.quota,
            confirmed: sale.confirmed,
            pending: sale.pending,
            available: sale.available(),
            confirmed_orders: sale.confirmed_orders,
            status: sale.status(),
            version: self.product.version,
        })
    }

    /// The answer for an order this product already decided, if any.
    fn known(&self, order: &PurchaseOrder) -> Option<Known> {
        let Some(sale) = self.sale() else {
            return Some(Known::Answer(Err(PurchaseError::UnknownProduct)));
        };
        if let Some(reservation) = sale.reservations.get(&order.order_id) {
            if (reservation.account_id, reservation.amount) != (order.account_id, order.amount) {
                return Some(Known::Answer(Err(PurchaseError::KeyReused)));
            }
            return Some(match reservation.state {
                ReservationState::Pending => Known::Pending,
                ReservationState::Confirmed => Known::Answer(Ok(self.receipt(
                    order.order_id,
                    reservation.account_id,
                    reservation.amount,
                ))),
                ReservationState::Released => {
                    let reason = reservation
                        .released_because
                        .expect("BUG: released without a reason");
                    Known::Answer(Err(released_error(reason)))
                }
            });
        }
        if let Some(refusal) = sale.refusals.get(&order.order_id) {
            if (refusal.account_id, refusal.amount) != (order.account_id, order.amount) {
                return Some(Known::Answer(Err(PurchaseError::KeyReused)));
            }
            return Some(Known::Answer(Err(refused_error(refusal.reason, sale))));
        }
        // Sold out is final: no confirmed quota ever comes back. Answer from
        // memory without touching the store. (With several processes on one
        // product, an order another process refused for another reason, and
        // this one has not read yet, is answered `SoldOut`: still a refusal.)
        if sale.status() == SaleStatus::SoldOut {
            EngineStats::bump(&self.stats.sold_out_from_memory);
            return Some(Known::Answer(Err(PurchaseError::SoldOut)));
        }
        None
    }

    fn receipt(&self, order_id: OrderId, account_id: AccountId, amount: Amount) -> Placed {
        Placed {
            receipt: PurchaseReceipt {
                order_id,
                product_id: self.product_id.clone(),
                account_id,
                amount,
            },
            visible_at: self.product.position,
        }
    }

    /// Decides settlements and purchases against the state (evolving it in
    /// place), appends them in one transaction, and answers. On a conflict or
    /// an unknown outcome the state is reloaded and everything decided again:
    /// decisions are idempotent per order, so nothing happens twice.
    async fn append_batch(&mut self, mut purchases: Vec<(PurchaseOrder, PurchaseReply)>) {
        for _round in 0..PRODUCT_ROUNDS_MAX {
            if self.stale && !self.reload().await {
                tokio::time::sleep(STORE_RETRY_PAUSE).await;
                continue;
            }
            let now = self.clock.now();
            let version_before = self.product.version;
            let mut events: Vec<NewEvent> = Vec::new();
            let settlements = std::mem::take(&mut self.to_settle);
            for (order_id, settlement) in &settlements {
                events.extend(self.decide_settlement(*order_id, *settlement, now));
            }
            let expires_at = now + self.settings.reservation_ttl;
            let mut decided = Vec::with_capacity(purchases.len());
            let mut refused = 0;
            let mut from_memory = 0;
            for (order, _) in &purchases {
                let command = ProductCommand::Purchase {
                    order_id: order.order_id,
                    account_id: order.account_id,
                    amount: order.amount,
                    expires_at,
                };
                match ProductSale::decide(&self.product.state, &command, now) {
                    Ok(new) if decides_nothing(&new) => {
                        from_memory += 1;
                        decided.push(Decided::Refused(refused_error(
                            refusal_reason(&new),
                            self.sale().expect("BUG: a refusal needs a sale"),
                        )));
                    }
                    Ok(new) => {
                        refused += new
                            .iter()
                            .filter(|e| matches!(e, ProductEvent::PurchaseRefused { .. }))
                            .count() as u64;
                        let metadata = order.context.metadata(Some(order.order_id.0), None);
                        events.extend(encode_all(&new, &metadata));
                        self.evolve_all(&new);
                        decided.push(Decided::New);
                    }
                    // Already decided (a duplicate in this batch, or committed
                    // by an append whose answer was lost): answered below.
                    Err(ProductRejection::DuplicateOrder) => decided.push(Decided::Before),
                    Err(rejection) => panic!("BUG: a purchase cannot be rejected with {rejection}"),
                }
            }
            // Everything decided above is in memory only until the append.
            self.undurable = events.len();
            // Refusals answered from memory are only as good as the memory:
            // an append proves it current (its expected version held);
            // without one, the stream is checked for events not seen yet.
            if events.is_empty() && from_memory > 0 {
                match self.is_current().await {
                    Ok(true) => {}
                    Ok(false) => {
                        self.stale = true;
                        continue;
                    }
                    Err(error) => {
                        self.on_append_failure(&error, settlements).await;
                        continue;
                    }
                }
            }
            if !self.lease_live() {
                // Decided, but not by a live owner: nothing is appended, and
                // the next turn claims the lease again (and reloads).
                self.to_settle = settlements;
                self.stale = true;
                break;
            }
            if !events.is_empty() {
                match self
                    .store
                    .append(&self.stream, expected_after(version_before), events)
                    .await
                {
                    Ok(appended) => {
                        EngineStats::bump(&self.stats.product_appends);
                        self.stats
                            .purchases_refused
                            .fetch_add(refused, std::sync::atomic::Ordering::Relaxed);
                        self.appended(version_before, self.undurable, &appended);
                    }
                    Err(error) => {
                        self.on_append_failure(&error, settlements).await;
                        continue;
                    }
                }
            }
            self.stats
                .purchases_refused
                .fetch_add(from_memory, std::sync::atomic::Ordering::Relaxed);
            for ((order, reply), decided) in purchases.drain(..).zip(decided) {
                let new = match decided {
                    Decided::Refused(error) => {
                        let _ = reply.send(Err(error));
                        continue;
                    }
                    Decided::New => true,
                    Decided::Before => false,
                };
                let reserved = self
                    .sale()
                    .is_some_and(|sale| sale.reservations.contains_key(&order.order_id));
                if new && reserved {
                    self.contexts.insert(order.order_id, order.context.clone());
                }
                self.answer_or_wait(order, reply);
            }
            self.answer_waiters();
            return;
        }
        let why = if self.lease_live() {
            "the product stream kept conflicting"
        } else {
            "this node's lease on the product lapsed"
        };
        for (_, reply) in purchases {
            let _ = reply.send(Err(PurchaseError::Unavailable(why.into())));
        }
    }

    /// Whether the stream holds no event this writer has not seen.
    async fn is_current(&self) -> Result<bool, StoreError> {
        let newer = self
            .store
            .read_stream(&self.stream, self.product.version, 1)
            .await?;
        Ok(newer.is_empty())
    }

    async fn on_append_failure(
        &mut self,
        error: &StoreError,
        settlements: Vec<(OrderId, Settlement)>,
    ) {
        // Put the settlements back: after the reload they are decided again
        // (and skipped if they did commit).
        self.to_settle = settlements;
        self.stale = true;
        if matches!(error, StoreError::Conflict(_)) {
            EngineStats::bump(&self.stats.product_conflicts);
        } else {
            EngineStats::bump(&self.stats.append_failures);
            tracing::warn!(product = %self.product_id, %error, "product append failed; reloading");
            tokio::time::sleep(STORE_RETRY_PAUSE).await;
        }
    }

    fn answer_or_wait(&mut self, order: PurchaseOrder, reply: PurchaseReply) {
        self.assert_durable();
        match self.known(&order) {
            Some(Known::Answer(answer)) => {
                let _ = reply.send(answer);
            }
            Some(Known::Pending) => {
                self.to_debit.push(order.order_id);
                self.waiters.entry(order.order_id).or_default().push(reply);
            }
            None => unreachable!("BUG: a decided purchase is known"),
        }
    }

    fn decide_settlement(
        &mut self,
        order_id: OrderId,
        settlement: Settlement,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Vec<NewEvent> {
        let command = match settlement {
            Settlement::Confirm => ProductCommand::Confirm { order_id },
            Settlement::Release(reason) => ProductCommand::Release { order_id, reason },
        };
        match ProductSale::decide(&self.product.state, &command, now) {
            Ok(new) => {
                let context = self
                    .contexts
                    .get(&order_id)
                    .cloned()
                    .unwrap_or_else(RequestContext::system);
                let encoded = encode_all(&new, &context.metadata(Some(order_id.0), None));
                self.evolve_all(&new);
                encoded
            }
            // Another writer released it while we took the money: give it back.
            Err(ProductRejection::NotPending(ReservationState::Released))
                if matches!(settlement, Settlement::Confirm) =>
            {
                self.queue_refund(order_id);
                Vec::new()
            }
            // Already settled (by us in a lost answer, or by another writer).
            Err(ProductRejection::NotPending(_)) => Vec::new(),
            Err(rejection) => panic!("BUG: settling {order_id} was rejected: {rejection}"),
        }
    }

    fn evolve_all(&mut self, events: &[ProductEvent]) {
        for event in events {
            self.product.state =
                ProductSale::evolve(std::mem::take(&mut self.product.state), event);
        }
    }

    /// Answers every waiter whose order is no longer pending.
    fn answer_waiters(&mut self) {
        self.assert_durable();
        let Some(sale) = self.product.state.sale.as_ref() else {
            return;
        };
        let settled: Vec<OrderId> = self
            .waiters
            .keys()
            .filter(|order_id| {
                sale.reservations
                    .get(order_id)
                    .is_some_and(|r| r.state != ReservationState::Pending)
            })
            .copied()
            .collect();
        for order_id in settled {
            let reservation = &sale.reservations[&order_id];
            let answer = match reservation.state {
                ReservationState::Confirmed => {
                    Ok(self.receipt(order_id, reservation.account_id, reservation.amount))
                }
                _ => Err(released_error(
                    reservation
                        .released_because
                        .expect("BUG: released without a reason"),
                )),
            };
            let counter = if answer.is_ok() {
                &self.stats.purchases_confirmed
            } else {
                &self.stats.purchases_refused
            };
            EngineStats::bump(counter);
            for reply in self.waiters.remove(&order_id).unwrap_or_default() {
                let _ = reply.send(answer.clone());
            }
            self.contexts.remove(&order_id);
        }
    }

    /// Debits the buyers of the reservations waiting for payment, in one
    /// batched append; their confirmations or releases go into the next
    /// product append.
    async fn debit(&mut self) {
        // An order may be queued more than once (a duplicate request, the
        // sweep, a reload) or already be settling: debit each once, here,
        // with one set per turn instead of a search per queued order.
        let settling: HashSet<OrderId> = self.to_settle.iter().map(|(id, _)| *id).collect();
        let mut seen = HashSet::new();
        let mut orders = std::mem::take(&mut self.to_debit);
        orders.retain(|order_id| !settling.contains(order_id) && seen.insert(*order_id));
        let Some(sale) = self.sale() else { return };
        let jobs: Vec<(OrderId, AccountJob)> = orders
            .into_iter()
            .filter_map(|order_id| {
                let reservation = sale.reservations.get(&order_id)?;
                (reservation.state == ReservationState::Pending).then(|| {
                    let job = AccountJob {
                        account_id: reservation.account_id,
                        command: AccountCommand::DebitForPurchase {
                            order_id,
                            product_id: self.product_id.clone(),
                            amount: reservation.amount,
                            reservation_expires_at: reservation.expires_at,
                            currency: sale.terms.currency,
                        },
                        correlation_id: Some(order_id.0),
                        context: self
                            .contexts
                            .get(&order_id)
                            .cloned()
                            .unwrap_or_else(RequestContext::system),
                    };
                    (order_id, job)
                })
            })
            .collect();
        let (order_ids, jobs): (Vec<OrderId>, Vec<AccountJob>) = jobs.into_iter().unzip();
        let outcomes = self.accounts.execute_batch(jobs, self.clock.now()).await;
        let mut unavailable = false;
        for (order_id, (outcome, _)) in order_ids.into_iter().zip(outcomes) {
            let settlement = match outcome {
                JobOutcome::Done => Settlement::Confirm,
                JobOutcome::Rejected(AccountRejection::InsufficientFunds { .. }) => {
                    Settlement::Release(ReleaseReason::InsufficientFunds)
                }
                JobOutcome::Rejected(AccountRejection::ReservationExpired(_)) => {
                    Settlement::Release(ReleaseReason::Expired)
                }
                JobOutcome::Rejected(AccountRejection::CurrencyMismatch { .. }) => {
                    Settlement::Release(ReleaseReason::CurrencyMismatch)
                }
                JobOutcome::Rejected(rejection) => {
                    tracing::info!(%order_id, %rejection, "payment refused");
                    Settlement::Release(ReleaseReason::PaymentFailed)
                }
                JobOutcome::Unavailable(_) => {
                    unavailable = true;
                    self.to_debit.push(order_id);
                    continue;
                }
            };
            self.to_settle.push((order_id, settlement));
        }
        if unavailable {
            tokio::time::sleep(STORE_RETRY_PAUSE).await;
        }
    }

    /// Gives back money taken for reservations that ended released.
    async fn refund(&mut self) {
        let orders = std::mem::take(&mut self.to_refund);
        let Some(sale) = self.sale() else { return };
        let (order_ids, jobs): (Vec<OrderId>, Vec<AccountJob>) = orders
            .into_iter()
            .filter_map(|order_id| {
                let reservation = sale.reservations.get(&order_id)?;
                let job = AccountJob {
                    account_id: reservation.account_id,
                    command: AccountCommand::Refund { order_id },
                    correlation_id: Some(order_id.0),
                    context: RequestContext::system(),
                };
                Some((order_id, job))
            })
            .unzip();
        let mut unavailable = false;
        let outcomes = self.accounts.execute_batch(jobs, self.clock.now()).await;
        for (order_id, (outcome, _)) in order_ids.into_iter().zip(outcomes) {
            match outcome {
                JobOutcome::Done => {
                    EngineStats::bump(&self.stats.refunds);
                    tracing::info!(%order_id, "refunded a payment whose reservation was released");
                }
                JobOutcome::Rejected(
                    AccountRejection::AlreadyRefunded | AccountRejection::UnknownOrder,
                ) => {}
                JobOutcome::Rejected(rejection) => {
                    tracing::error!(%order_id, %rejection, "refund refused")
                }
                JobOutcome::Unavailable(_) => {
                    unavailable = true;
                    self.to_refund.push(order_id);
                }
            }
        }
        if unavailable {
            tokio::time::sleep(STORE_RETRY_PAUSE).await;
        }
    }

    /// Reloads the product from the store and queues recovery work: pending
    /// reservations resume at the debit step (which is idempotent and refuses
    /// expired ones); a confirmation this writer queued (so it took the money)
    /// for an order that another writer released meanwhile becomes a refund;
    /// and on the first load, every released order of this product is checked
    /// for money still taken (a crash between a release and its refund).
    /// Returns false if the store could not be read; the reload is then retried.
    async fn reload(&mut self) -> bool {
        let mut fresh = Loaded::default();
        if let Err(error) = fresh
            .catch_up::<ProductSale>(self.store.as_ref(), &self.stream)
            .await
        {
            tracing::warn!(product = %self.product_id, %error, "could not load the product stream");
            return false;
        }
        // Versions only grow: the log never loses what this writer saw
        // committed.
        assert!(
            fresh.version >= self.product.version,
            "BUG: product {} went back from version {} to {} on reload",
            self.product_id,
            self.product.version,
            fresh.version
        );
        self.product = fresh;
        // The state is now exactly what the store holds.
        self.undurable = 0;
        let Some(sale) = self.product.state.sale.as_ref() else {
            self.stale = false;
            return true;
        };
        let mut pending: Vec<OrderId> = Vec::new();
        let mut released: Vec<(OrderId, AccountId)> = Vec::new();
        for (order_id, reservation) in &sale.reservations {
            match reservation.state {
                ReservationState::Pending => pending.push(*order_id),
                ReservationState::Released => released.push((*order_id, reservation.account_id)),
                ReservationState::Confirmed => {}
            }
        }
        pending.sort();
        released.sort();
        let paid_then_released: Vec<OrderId> = self
            .to_settle
            .iter()
            .filter(|(order_id, settlement)| {
                matches!(settlement, Settlement::Confirm)
                    && sale.reservations.get(order_id).map(|r| r.state)
                        == Some(ReservationState::Released)
            })
            .map(|(order_id, _)| *order_id)
            .collect();
        self.to_settle
            .retain(|(order_id, _)| pending.binary_search(order_id).is_ok());
        for order_id in paid_then_released {
            self.queue_refund(order_id);
        }
        self.to_debit.extend(pending);
        if !self.scanned_released {
            if let Err(error) = self.queue_stray_refunds(released).await {
                tracing::warn!(product = %self.product_id, %error, "could not check released orders for payments");
                return false;
            }
            self.scanned_released = true;
        }
        self.stale = false;
        self.answer_waiters();
        true
    }

    /// Moves the state's version past an append of `count` events made
    /// at `version_before`, checking the store's answer: the append was
    /// fenced by the expected version, so its versions are the dense run
    /// right after `version_before` (even when answered as a duplicate), and
    /// its positions increase with them.
    fn appended(&mut self, version_before: i64, count: usize, appended: &Appended) {
        assert_eq!(
            self.product.version, version_before,
            "BUG: product {} moved while its append was in flight",
            self.product_id
        );
        check_product_append(&self.product_id, version_before, count, appended);
        self.product.version = appended.last_version;
        self.product.position = self.product.position.max(appended.last_position);
        self.undurable = 0;
    }

    /// A reply read from the state is a promise that the events behind it
    /// are committed: no answer may leave while the state holds events not
    /// yet appended, or may not match the store.
    fn assert_durable(&self) {
        assert!(
            self.undurable == 0 && !self.stale,
            "BUG: product {} answering with {} events not yet durable (stale: {})",
            self.product_id,
            self.undurable,
            self.stale
        );
    }

    fn queue_refund(&mut self, order_id: OrderId) {
        if !self.to_refund.contains(&order_id) {
            self.to_refund.push(order_id);
        }
    }

    /// Queues a refund for every released order of this product whose
    /// payment is still held.
    async fn queue_stray_refunds(
        &mut self,
        released: Vec<(OrderId, AccountId)>,
    ) -> Result<(), StoreError> {
        for (order_id, account_id) in released {
            let (state, _) = self.accounts.state(account_id).await?;
            let paid = state
                .account
                .as_ref()
                .and_then(|account| account.purchases.get(&order_id))
                .is_some_and(|purchase| {
                    !purchase.refunded && purchase.product_id == self.product_id
                });
            if paid {
                self.queue_refund(order_id);
            }
        }
        Ok(())
    }

    /// Queues pending reservations past their expiry for resolution: the debit
    /// step confirms those already paid and refuses payment for the others,
    /// which are then released as expired.
    fn sweep_expired(&mut self) {
        let now = self.clock.now();
        let Some(sale) = self.sale() else { return };
        let mut expired: Vec<OrderId> = sale
            .reservations
            .iter()
            .filter(|(_, r)| r.state == ReservationState::Pending && r.expires_at <= now)
            .map(|(order_id, _)| *order_id)
            .collect();
        expired.sort();
        self.to_debit.extend(expired);
    }

    /// Runs an administrative product command (list, open, close, release).
    async fn execute(
        &mut self,
        command: ProductCommand,
        context: RequestContext,
    ) -> Result<Option<Appended>, CommandError> {
        for _round in 0..PRODUCT_ROUNDS_MAX {
            if self.stale && !self.reload().await {
                return Err(CommandError::Unavailable);
            }
            let events = ProductSale::decide(&self.product.state, &command, self.clock.now())?;
            if events.is_empty() {
                return Ok(None);
            }
            if !self.lease_live() {
                self.stale = true;
                return Err(CommandError::Unavailable);
            }
            let encoded = encode_all(&events, &context.metadata(None, None));
            let encoded_count = encoded.len();
            match self
                .store
                .append(&self.stream, expected_after(self.product.version), encoded)
                .await
            {
                Ok(appended) => {
                    let version_before = self.product.version;
                    self.evolve_all(&events);
                    self.appended(version_before, encoded_count, &appended);
                    if let ProductCommand::Release { order_id, .. } = command {
                        // A cancelled order may have been paid already; the
                        // refund is a no-op when it was not.
                        self.queue_refund(order_id);
                    }
                    self.answer_waiters();
                    return Ok(Some(appended));
                }
                Err(StoreError::Conflict(_)) => self.stale = true,
                Err(error) => {
                    self.stale = true;
                    return Err(error.into());
                }
            }
        }
        Err(CommandError::Contention(self.stream.clone()))
    }
}

/// The store's answer to a product append of `count` events expected at
/// `version_before`: the dense run of versions right after it, with
/// positions growing at least as fast.
fn check_product_append(
    product_id: &ProductId,
    version_before: i64,
    count: usize,
    appended: &Appended,
) {
    let count = i64::try_from(count).expect("BUG: a batch's size fits i64");
    assert!(count > 0, "BUG: an empty product append");
    assert!(
        appended.first_version == version_before + 1
            && appended.last_version == version_before + count,
        "BUG: product {product_id} appended {count} events after version {version_before} \
         and the store answered versions {}..={} (duplicate: {})",
        appended.first_version,
        appended.last_version,
        appended.duplicate
    );
    assert!(
        appended.last_position >= appended.first_position + (count - 1),
        "BUG: product {product_id} got positions {}..={} for {count} events",
        appended.first_position,
        appended.last_position
    );
}

/// How a purchase of a batch was decided.
enum Decided {
    /// Events of its own are in the batch.
    New,
    /// It was decided before (its answer is in the state).
    Before,
    /// Refused from memory, with nothing appended.
    Refused(PurchaseError),
}

/// Whether a purchase's events are only a refusal that decides nothing:
/// the sale is not open, or the amount is outside the product's range.
/// Such a refusal changes no state and gives nobody a place, so it is
/// answered without being appended (a retry is decided afresh). Sold out
/// and insufficient quota stay events: they are the sale's fairness
/// record (who was turned away while others got quota).
fn decides_nothing(events: &[ProductEvent]) -> bool {
    matches!(
        events,
        [ProductEvent::PurchaseRefused {
            reason: RefusalReason::SaleNotOpen | RefusalReason::AmountOutOfRange,
            ..
        }]
    )
}

fn refusal_reason(events: &[ProductEvent]) -> RefusalReason {
    match events {
        [ProductEvent::PurchaseRefused { reason, .. }] => *reason,
        _ => panic!("BUG: not a single refusal"),
    }
}

fn fail_all(messages: Vec<WriterMessage>, why: &str) {
    for message in messages {
        match message {
            WriterMessage::Purchase(_, reply) => {
                let _ = reply.send(Err(PurchaseError::Unavailable(why.to_owned())));
            }
            WriterMessage::Command(_, _, reply) => {
                let _ = reply.send(Err(CommandError::Unavailable));
            }
            WriterMessage::Snapshot(reply) => {
                let _ = reply.send(Err(CommandError::Unavailable));
            }
            // The recovery sweep asks again.
            WriterMessage::RefundStrays(_) => {}
        }
    }
}

/// Answers messages for a product another node owns.
fn refuse_all(messages: Vec<WriterMessage>, owner: &NodeAddress) {
    for message in messages {
        match message {
            WriterMessage::Purchase(_, reply) => {
                let _ = reply.send(Err(PurchaseError::NotOwner(owner.clone())));
            }
            WriterMessage::Command(_, _, reply) => {
                let _ = reply.send(Err(CommandError::NotOwner(owner.clone())));
            }
            WriterMessage::Snapshot(reply) => {
                let _ = reply.send(Err(CommandError::NotOwner(owner.clone())));
            }
            // The owner's own sweep refunds them.
            WriterMessage::RefundStrays(_) => {}
        }
    }
}

fn released_error(reason: ReleaseReason) -> PurchaseError {
    match reason {
        ReleaseReason::InsufficientFunds => PurchaseError::InsufficientFunds,
        ReleaseReason::Expired => PurchaseError::Expired,
        ReleaseReason::CurrencyMismatch => PurchaseError::CurrencyMismatch,
        ReleaseReason::PaymentFailed | ReleaseReason::Cancelled => PurchaseError::PaymentFailed,
    }
}

fn refused_error(reason: RefusalReason, sale: &Sale) -> PurchaseError {
    match reason {
        RefusalReason::SaleNotOpen => PurchaseError::SaleNotOpen,
        RefusalReason::SoldOut => PurchaseError::SoldOut,
        RefusalReason::InsufficientQuota => PurchaseError::InsufficientQuota,
        RefusalReason::AmountOutOfRange => PurchaseError::AmountOutOfRange {
            min: sale.terms.min_purchase,
            max: sale.terms.max_purchase,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(versions: (i64, i64), positions: (i64, i64)) -> Appended {
        Appended {
            stream_id: "product-fund-a".into(),
            first_version: versions.0,
            last_version: versions.1,
            first_position: positions.0,
            last_position: positions.1,
            duplicate: false,
        }
    }

    fn product() -> ProductId {
        ProductId::parse("fund-a").unwrap()
    }

    #[test]
    fn an_append_right_after_the_decided_version_passes() {
        check_product_append(&product(), 7, 3, &answer((8, 10), (100, 102)));
        // Positions may leave gaps (EventStoreDB, rolled-back appends).
        check_product_append(&product(), 0, 2, &answer((1, 2), (5, 900)));
    }

    #[test]
    #[should_panic(expected = "BUG: product fund-a appended 3 events after version 7")]
    fn an_append_that_skips_a_version_is_a_bug() {
        check_product_append(&product(), 7, 3, &answer((9, 11), (100, 102)));
    }

    #[test]
    #[should_panic(expected = "BUG: product fund-a appended 3 events after version 7")]
    fn an_append_that_goes_back_is_a_bug() {
        check_product_append(&product(), 7, 3, &answer((6, 8), (100, 102)));
    }

    #[test]
    #[should_panic(expected = "BUG: product fund-a got positions 100..=101 for 3 events")]
    fn positions_denser_than_the_events_are_a_bug() {
        check_product_append(&product(), 7, 3, &answer((8, 10), (100, 101)));
    }
}
