//! A realistic generated history for benchmarks and tests: many accounts, a
//! few hot products, deposits, purchases (confirmed, refused, released and
//! refunded), withdrawals and payouts (some with ambiguous outcomes).
//!
//! Every event comes from the domain's deciders, so the history is one the
//! engine could have written; it is deterministic for a seed.

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::account::{AccountCommand, AccountState, CustomerAccount};
use domain::payout::{Payout, PayoutCommand, PayoutKind, PayoutState, ProviderFinding};
use domain::product::{ProductCommand, ProductSale, ProductState, ProductTerms, ReleaseReason};
use domain::{AccountId, Amount, Currency, Decider, EventType, OrderId, PayoutId, ProductId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use store::codec::encode;
use store::{ExpectedVersion, Metadata, NewEvent, StreamAppend};
use uuid::Uuid;

/// The size of a generated history.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Customer accounts opened (over time).
    pub accounts: usize,
    /// Products for sale; the first is the hottest.
    pub products: usize,
    /// Seed of every choice.
    pub seed: u64,
}

/// Pending holdings remembered for payouts (a bounded sample).
const HOLDINGS_MAX: usize = 10_000;
/// Pending reservations remembered for later release.
const PENDING_MAX: usize = 1_000;

struct Stream<S> {
    state: S,
    version: i64,
}

impl<S: Default> Stream<S> {
    fn new() -> Stream<S> {
        Stream {
            state: S::default(),
            version: 0,
        }
    }
}

/// The generator.
pub struct History {
    shape: Shape,
    rng: StdRng,
    now: DateTime<Utc>,
    products: Vec<(ProductId, Stream<ProductState>)>,
    accounts: Vec<(AccountId, Stream<AccountState>)>,
    pending: Vec<(usize, OrderId, usize, bool)>,
    holdings: Vec<(usize, usize, Amount)>,
    payouts: u64,
    /// The batch being built, per stream, product streams first, then payouts,
    /// then accounts: so a reservation precedes its debit and a release its
    /// refund, as the engine writes them. (A confirmation may precede its
    /// debit within a batch; the read models must not care.)
    batch: BTreeMap<(u8, String), StreamAppend>,
    batch_events: usize,
}

impl History {
    /// A generator for `shape`; products are listed and opened in the first batch.
    pub fn new(shape: Shape) -> History {
        assert!(shape.accounts > 0 && shape.products > 0, "BUG: empty shape");
        History {
            shape,
            rng: StdRng::seed_from_u64(shape.seed),
            now: Utc
                .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
                .single()
                .expect("BUG: a valid date"),
            products: Vec::new(),
            accounts: Vec::new(),
            pending: Vec::new(),
            holdings: Vec::new(),
            payouts: 0,
            batch: BTreeMap::new(),
            batch_events: 0,
        }
    }

    /// The next appends, together about `events` events (at least one), one
    /// entry per stream with its exact expected version.
    pub fn next_batch(&mut self, events: usize) -> Vec<StreamAppend> {
        if self.products.is_empty() {
            self.list_products();
        }
        while self.batch_events < events.max(1) {
            self.act();
        }
        self.batch_events = 0;
        std::mem::take(&mut self.batch).into_values().collect()
    }

    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.random()).into_uuid()
    }

    fn record<E: Serialize + EventType>(
        &mut self,
        stream: String,
        version_before: i64,
        events: &[E],
        correlation: Option<Uuid>,
    ) {
        let metadata = Metadata {
            correlation_id: correlation,
            actor_id: Some("history".to_owned()),
            actor_role: Some("system".to_owned()),
            ..Metadata::default()
        };
        let encoded: Vec<NewEvent> = events
            .iter()
            .map(|event| {
                let id = self.uuid();
                encode(event, id, metadata.clone())
            })
            .collect();
        self.batch_events += encoded.len();
        let expected = if version_before == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version_before)
        };
        let rank = match stream.split_once('-').map(|(kind, _)| kind) {
            Some("product") => 0,
            Some("payout") => 1,
            _ => 2,
        };
        self.batch
            .entry((rank, stream.clone()))
            .or_insert_with(|| StreamAppend {
                stream_id: stream,
                expected,
                events: Vec::new(),
            })
            .events
            .extend(encoded);
    }

    fn product(
        &mut self,
        index: usize,
        command: ProductCommand,
        correlation: Option<Uuid>,
    ) -> bool {
        self.now += Duration::milliseconds(1);
        let (id, stream) = &mut self.products[index];
        let Ok(events) = ProductSale::decide(&stream.state, &command, self.now) else {
            return false;
        };
        let (name, before) = (id.stream(), stream.version);
        apply::<ProductSale>(stream, &events);
        let changed = !events.is_empty();
        self.record(name, before, &events, correlation);
        changed
    }

    fn account(
        &mut self,
        index: usize,
        command: AccountCommand,
        correlation: Option<Uuid>,
    ) -> bool {
        self.now += Duration::milliseconds(1);
        let (id, stream) = &mut self.accounts[index];
        let Ok(events) = CustomerAccount::decide(&stream.state, &command, self.now) else {
            return false;
        };
        let (name, before) = (id.stream(), stream.version);
        apply::<CustomerAccount>(stream, &events);
        self.record(name, before, &events, correlation);
        true
    }

    fn list_products(&mut self) {
        for index in 0..self.shape.products {
            let product_id = ProductId::parse(&format!("bench-{index}")).expect("BUG: a valid id");
            self.products.push((product_id.clone(), Stream::new()));
            let terms = ProductTerms {
                name: format!("Bench product {index}"),
                currency: Currency::CNY,
                quota: amount(1_000_000_000_000),
                min_purchase: amount(100),
                max_purchase: amount(1_000_000),
                annual_rate_bps: 450,
                term_days: 90,
            };
            assert!(self.product(index, ProductCommand::List { product_id, terms }, None));
            assert!(self.product(index, ProductCommand::Open, None));
        }
    }

    fn act(&mut self) {
        let opened = self.accounts.len();
        let roll = self.rng.random_range(0..100);
        if opened < 2 || (roll < 8 && opened < self.shape.accounts) {
            self.open_account();
        } else if roll < 25 {
            let index = self.rng.random_range(0..opened);
            self.deposit(index);
        } else if roll < 75 {
            let index = self.rng.random_range(0..opened);
            self.purchase(index);
        } else if roll < 85 {
            self.release_pending();
        } else if roll < 90 {
            let index = self.rng.random_range(0..opened);
            self.withdraw(index);
        } else {
            self.pay_out();
        }
    }

    fn open_account(&mut self) {
        let account_id = AccountId(self.uuid());
        self.accounts.push((account_id, Stream::new()));
        let index = self.accounts.len() - 1;
        let open = AccountCommand::Open {
            account_id,
            currency: Currency::CNY,
        };
        assert!(self.account(index, open, None));
        self.deposit(index);
    }

    fn deposit(&mut self, index: usize) {
        let reference = format!("dep-{}", self.uuid().simple());
        let amount = amount(self.rng.random_range(10_000..1_000_000));
        self.account(index, AccountCommand::Deposit { amount, reference }, None);
    }

    fn withdraw(&mut self, index: usize) {
        let available = self.accounts[index]
            .1
            .state
            .account
            .as_ref()
            .map_or(0, |a| a.available.minor());
        if available < 2 {
            return;
        }
        let reference = format!("wd-{}", self.uuid().simple());
        let amount = amount(self.rng.random_range(1..available / 2 + 1));
        self.account(index, AccountCommand::Withdraw { amount, reference }, None);
    }

    fn hot_product(&mut self) -> usize {
        // Most buyers want the first product.
        if self.rng.random_bool(0.6) {
            0
        } else {
            self.rng.random_range(0..self.products.len())
        }
    }

    fn purchase(&mut self, account: usize) {
        let product = self.hot_product();
        let order_id = OrderId(self.uuid());
        let correlation = Some(order_id.0);
        let amount = amount(self.rng.random_range(50..200_000));
        let product_id = self.products[product].0.clone();
        let account_id = self.accounts[account].0;
        let reserve = ProductCommand::Purchase {
            order_id,
            account_id,
            amount,
            expires_at: self.now + Duration::seconds(60),
        };
        let reserved = self.product(product, reserve, correlation)
            && self.products[product]
                .1
                .state
                .sale
                .as_ref()
                .is_some_and(|s| s.reservations.contains_key(&order_id));
        if !reserved {
            return;
        }
        let debit = AccountCommand::DebitForPurchase {
            order_id,
            product_id,
            amount,
            reservation_expires_at: self.now + Duration::seconds(60),
            currency: Currency::CNY,
        };
        let paid = self.account(account, debit, correlation);
        if !paid {
            let release = ProductCommand::Release {
                order_id,
                reason: ReleaseReason::InsufficientFunds,
            };
            self.product(product, release, correlation);
        } else if self.rng.random_bool(0.9) || self.pending.len() >= PENDING_MAX {
            self.product(product, ProductCommand::Confirm { order_id }, correlation);
            if self.holdings.len() < HOLDINGS_MAX {
                self.holdings.push((account, product, amount));
            } else {
                let slot = self.rng.random_range(0..HOLDINGS_MAX);
                self.holdings[slot] = (account, product, amount);
            }
        } else {
            self.pending.push((product, order_id, account, paid));
        }
    }

    fn release_pending(&mut self) {
        let Some((product, order_id, account, paid)) = self.pending.pop() else {
            return;
        };
        let correlation = Some(order_id.0);
        let release = ProductCommand::Release {
            order_id,
            reason: ReleaseReason::PaymentFailed,
        };
        if self.product(product, release, correlation) && paid {
            self.account(account, AccountCommand::Refund { order_id }, correlation);
        }
    }

    fn pay_out(&mut self) {
        if self.holdings.is_empty() {
            return;
        }
        // Each holding is paid its term's interest once, so no holder is
        // ever paid beyond what the product owes (the drift check's
        // entitlement oracle holds on generated histories too).
        let slot = self.rng.random_range(0..self.holdings.len());
        let (account, product, principal) = self.holdings.swap_remove(slot);
        let interest = domain::payout::interest_for(principal, 450, 90).0.minor();
        if interest == 0 {
            return;
        }
        self.payouts += 1;
        let payout_id = PayoutId(self.uuid());
        let product_id = self.products[product].0.clone();
        let account_id = self.accounts[account].0;
        let mut stream = Stream::<PayoutState>::new();
        let mut commands = vec![
            PayoutCommand::Schedule {
                payout_id,
                product_id: product_id.clone(),
                account_id,
                period: format!("q{}", self.payouts),
                kind: PayoutKind::Interest,
                amount: amount(interest),
                currency: Currency::CNY,
            },
            PayoutCommand::Attempt {
                lease_until: self.now + Duration::seconds(30),
            },
        ];
        let provider_ref = format!("pay-{}", self.uuid().simple());
        if self.rng.random_bool(0.2) {
            commands.push(PayoutCommand::RecordUnknown {
                attempt: 1,
                detail: "gateway timeout".to_owned(),
            });
            commands.push(PayoutCommand::Reconcile {
                finding: ProviderFinding::Paid { provider_ref },
            });
        } else {
            commands.push(PayoutCommand::RecordSucceeded {
                attempt: 1,
                provider_ref,
            });
        }
        let mut events = Vec::new();
        for command in &commands {
            self.now += Duration::milliseconds(1);
            let decided = Payout::decide(&stream.state, command, self.now)
                .expect("BUG: a valid payout history");
            apply::<Payout>(&mut stream, &decided);
            events.extend(decided);
        }
        self.record(payout_id.stream(), 0, &events, Some(payout_id.0));
        let credit = AccountCommand::CreditPayout {
            payout_id,
            product_id,
            kind: PayoutKind::Interest,
            amount: amount(interest),
        };
        self.account(account, credit, Some(payout_id.0));
    }
}

fn apply<D: Decider>(stream: &mut Stream<D::State>, events: &[D::Event]) {
    for event in events {
        stream.state = D::evolve(std::mem::take(&mut stream.state), event);
        stream.version += 1;
    }
}

fn amount(minor: i64) -> Amount {
    Amount::new(minor).expect("BUG: a valid amount")
}

/// A product's sale as the domain sees it, to check read models against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedSale {
    /// The product.
    pub product_id: String,
    /// Total for sale.
    pub quota: i64,
    /// Confirmed amount.
    pub confirmed: i64,
    /// Pending (reserved) amount.
    pub reserved: i64,
    /// What is left.
    pub available: i64,
    /// Confirmed orders.
    pub orders: i64,
    /// The sale's status.
    pub status: String,
}

/// An account as the domain sees it, to check read models against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedAccount {
    /// The account.
    pub account_id: String,
    /// Spendable balance.
    pub available: i64,
    /// Paid for orders not confirmed yet (and not refunded).
    pub held: i64,
    /// Sum of deposits.
    pub total_deposited: i64,
    /// Sum of purchase debits less refunds.
    pub total_invested: i64,
    /// Sum of payouts.
    pub total_paid_out: i64,
    /// Sum of withdrawals.
    pub total_withdrawn: i64,
}

impl History {
    /// Every product's sale, from the deciders' states.
    pub fn expected_sales(&self) -> Vec<ExpectedSale> {
        self.products
            .iter()
            .filter_map(|(id, stream)| {
                let sale = stream.state.sale.as_ref()?;
                let status = serde_json::to_value(sale.status()).ok()?;
                Some(ExpectedSale {
                    product_id: id.to_string(),
                    quota: sale.terms.quota.minor(),
                    confirmed: sale.confirmed.minor(),
                    reserved: sale.pending.minor(),
                    available: sale.available().minor(),
                    orders: i64::try_from(sale.confirmed_orders).expect("BUG: few orders"),
                    status: status.as_str()?.to_owned(),
                })
            })
            .collect()
    }

    /// Every account, from the deciders' states.
    pub fn expected_accounts(&self) -> Vec<ExpectedAccount> {
        self.accounts
            .iter()
            .filter_map(|(id, stream)| {
                let account = stream.state.account.as_ref()?;
                let held = account
                    .purchases
                    .iter()
                    .filter(|(order_id, purchase)| {
                        !purchase.refunded && !self.confirmed(&purchase.product_id, order_id)
                    })
                    .map(|(_, purchase)| purchase.amount.minor())
                    .sum();
                Some(ExpectedAccount {
                    account_id: id.to_string(),
                    available: account.available.minor(),
                    held,
                    total_deposited: account.total_deposited.minor(),
                    total_invested: account.total_invested.minor(),
                    total_paid_out: account.total_paid_out.minor(),
                    total_withdrawn: account.total_withdrawn.minor(),
                })
            })
            .collect()
    }

    fn confirmed(&self, product_id: &ProductId, order_id: &OrderId) -> bool {
        self.products
            .iter()
            .find(|(id, _)| id == product_id)
            .and_then(|(_, stream)| stream.state.sale.as_ref())
            .and_then(|sale| sale.reservations.get(order_id))
            .is_some_and(|r| r.state == domain::product::ReservationState::Confirmed)
    }
}
