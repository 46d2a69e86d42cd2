//! The independent oracle: the ledger's central rules checked from the raw
//! events, in log order, with arithmetic of its own. It never calls a
//! decider, `evolve` or `Sale::available()`, so a bug in the deciders'
//! bookkeeping cannot hide itself: the sum of amounts reserved and not
//! released is at most the quota at every position (never oversold); a
//! purchase is refused for want of quota only when the quota was really
//! short (never undersold); every confirmed order has exactly one matching
//! debit in its buyer's account stream and, once settled, every debit a
//! confirmed order or a refund; money taken equals money confirmed plus money
//! refunded; no balance is ever negative; every event's postings balance; no
//! payout is credited twice. Each violation names its rule and the position
//! of the event that broke it.

use domain::account::AccountEvent;
use domain::posting::{LedgerAccount, is_balanced};
use domain::product::{ProductEvent, RefusalReason};
use domain::{AccountId, OrderId, PayoutId, ProductId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// A rule of the ledger the oracle checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// More quota reserved and not released than the product has.
    Oversold,
    /// A purchase refused as sold out or short of quota while enough was left.
    Undersold,
    /// A reservation confirmed a second time.
    ConfirmedTwice,
    /// A reservation released after it was confirmed or released.
    SettledTwice,
    /// A confirmation or release of an order that was never reserved.
    UnknownReservation,
    /// A confirmation or release whose buyer or amount differ from the reservation.
    SettlementMismatch,
    /// An order reserved (or refused) a second time.
    ReservedTwice,
    /// A reservation taken while the sale was closed.
    ReservedWhileClosed,
    /// A reservation outside the product's minimum and maximum purchase.
    ReservationOutOfRange,
    /// A product event before its listing, or a second listing.
    NotListedOnce,
    /// An account event before its opening, a second opening, or an event
    /// naming another account than its stream's.
    NotOpenedOnce,
    /// A confirmation without a matching, unrefunded debit before it.
    ConfirmedWithoutDebit,
    /// A debit for an order that has no reservation.
    DebitWithoutReservation,
    /// A debit whose buyer, product or amount differ from its reservation.
    DebitMismatch,
    /// An order debited a second time.
    DebitedTwice,
    /// Once settled: money taken for an order that is not confirmed (and not released).
    DebitWithoutConfirmation,
    /// Once settled: money taken for a released order and never refunded.
    RefundMissing,
    /// A refund of an order never debited, refunded twice, or of another amount.
    RefundWithoutDebit,
    /// A refund of a confirmed order's debit.
    RefundOfConfirmed,
    /// Once settled: a product's money taken differs from confirmed plus refunded.
    MoneyNotConserved,
    /// Once settled: a reservation still pending.
    StillPending,
    /// An account's balance below zero.
    NegativeBalance,
    /// An account's balance beyond what an amount can hold.
    BalanceOverflow,
    /// An event whose postings do not balance.
    UnbalancedPostings,
    /// An account whose postings disagree with its events' amounts.
    PostingsDisagree,
    /// A payout credited a second time.
    PayoutCreditedTwice,
}

impl Rule {
    /// The rule's stable name, as reports and tests spell it.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Oversold => "oversold",
            Rule::Undersold => "undersold",
            Rule::ConfirmedTwice => "confirmed_twice",
            Rule::SettledTwice => "settled_twice",
            Rule::UnknownReservation => "unknown_reservation",
            Rule::SettlementMismatch => "settlement_mismatch",
            Rule::ReservedTwice => "reserved_twice",
            Rule::ReservedWhileClosed => "reserved_while_closed",
            Rule::ReservationOutOfRange => "reservation_out_of_range",
            Rule::NotListedOnce => "not_listed_once",
            Rule::NotOpenedOnce => "not_opened_once",
            Rule::ConfirmedWithoutDebit => "confirmed_without_debit",
            Rule::DebitWithoutReservation => "debit_without_reservation",
            Rule::DebitMismatch => "debit_mismatch",
            Rule::DebitedTwice => "debited_twice",
            Rule::DebitWithoutConfirmation => "debit_without_confirmation",
            Rule::RefundMissing => "refund_missing",
            Rule::RefundWithoutDebit => "refund_without_debit",
            Rule::RefundOfConfirmed => "refund_of_confirmed",
            Rule::MoneyNotConserved => "money_not_conserved",
            Rule::StillPending => "still_pending",
            Rule::NegativeBalance => "negative_balance",
            Rule::BalanceOverflow => "balance_overflow",
            Rule::UnbalancedPostings => "unbalanced_postings",
            Rule::PostingsDisagree => "postings_disagree",
            Rule::PayoutCreditedTwice => "payout_credited_twice",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One broken rule, where it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule.
    pub rule: Rule,
    /// The log position of the event that broke it.
    pub position: i64,
    /// The stream of that event.
    pub stream: String,
    /// What was seen, in words.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at position {} ({}): {}",
            self.rule, self.position, self.stream, self.detail
        )
    }
}

/// A product as the oracle counts it.
#[derive(Debug, Clone, Default)]
struct ProductBook {
    product_id: Option<ProductId>,
    quota: i64,
    min_purchase: i64,
    max_purchase: i64,
    open: bool,
    /// Reserved and not released (pending plus confirmed), summed here.
    held: i64,
    /// The most ever held at once.
    held_peak: i64,
    /// Confirmed, summed here.
    confirmed: i64,
}

/// Where an order's reservation stands, by the oracle's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OrderState {
    Pending,
    Confirmed,
    Released,
}

/// One reservation as the oracle saw it.
#[derive(Debug, Clone)]
struct OrderBook {
    product_stream: String,
    product_id: Option<ProductId>,
    account_id: AccountId,
    amount: i64,
    reserved_at: i64,
    state: OrderState,
}

/// One purchase debit as the oracle saw it.
#[derive(Debug, Clone)]
struct DebitBook {
    account_id: AccountId,
    product_id: ProductId,
    amount: i64,
    position: i64,
    stream: String,
    refunded: bool,
}

/// An account as the oracle counts it.
#[derive(Debug, Clone, Default)]
struct AccountBook {
    opened: bool,
    /// Balance from the events' amounts by kind.
    balance: i128,
    /// Balance from the events' postings to the customer's available account.
    posted: i128,
    last_position: i64,
}

/// The oracle: feed it every product and account event in log order, then
/// ask for violations.
#[derive(Debug, Clone, Default)]
pub struct Oracle {
    products: BTreeMap<String, ProductBook>,
    accounts: BTreeMap<String, AccountBook>,
    orders: HashMap<OrderId, OrderBook>,
    refused: HashMap<OrderId, i64>,
    debits: HashMap<OrderId, DebitBook>,
    payouts: HashMap<PayoutId, i64>,
    violations: Vec<Violation>,
    head: i64,
}

impl Oracle {
    /// An oracle that has seen nothing.
    pub fn new() -> Oracle {
        Oracle::default()
    }

    /// Observes one product event; returns whether it broke a rule.
    pub fn observe_product(&mut self, position: i64, stream: &str, event: &ProductEvent) -> bool {
        let before = self.violations.len();
        self.head = self.head.max(position);
        let at = At { position, stream };
        match event {
            ProductEvent::ProductListed { product_id, terms } => {
                let book = self.products.entry(stream.to_owned()).or_default();
                if book.product_id.is_some() {
                    let violation = at.violation(Rule::NotListedOnce, "listed twice".into());
                    self.violations.push(violation);
                } else {
                    book.product_id = Some(product_id.clone());
                    book.quota = terms.quota.minor();
                    book.min_purchase = terms.min_purchase.minor();
                    book.max_purchase = terms.max_purchase.minor();
                }
            }
            _ if !self.listed(stream) => {
                let violation = at.violation(Rule::NotListedOnce, "event before listing".into());
                self.violations.push(violation);
            }
            ProductEvent::SaleOpened {} => self.book(stream).open = true,
            ProductEvent::SaleClosed {} => self.book(stream).open = false,
            ProductEvent::QuotaReserved {
                order_id,
                account_id,
                amount,
                ..
            } => self.reserved(&at, *order_id, *account_id, amount.minor()),
            ProductEvent::ReservationConfirmed {
                order_id,
                account_id,
                amount,
            } => self.settled(&at, *order_id, *account_id, amount.minor(), true),
            ProductEvent::ReservationReleased {
                order_id,
                account_id,
                amount,
                ..
            } => self.settled(&at, *order_id, *account_id, amount.minor(), false),
            ProductEvent::PurchaseRefused {
                order_id,
                amount,
                reason,
                ..
            } => self.refused(&at, *order_id, amount.minor(), *reason),
            // Payouts against what is owed are the entitlement oracle's
            // (`projections::entitlement`, run by every drift check).
            ProductEvent::PayoutRunPlanned { .. } => {}
        }
        self.violations.len() > before
    }

    /// Observes one account event; returns whether it broke a rule.
    pub fn observe_account(&mut self, position: i64, stream: &str, event: &AccountEvent) -> bool {
        let before = self.violations.len();
        self.head = self.head.max(position);
        let at = At { position, stream };
        let opened = self.accounts.get(stream).is_some_and(|book| book.opened);
        let owner = event_account(event);
        let opening = matches!(event, AccountEvent::AccountOpened { .. });
        let structure = if opening && opened {
            Some("opened twice".to_owned())
        } else if owner.stream() != stream {
            Some(format!("event of account {owner} in another stream"))
        } else if !opening && !opened {
            Some("event before the account was opened".to_owned())
        } else {
            None
        };
        if let Some(detail) = structure {
            self.violations
                .push(at.violation(Rule::NotOpenedOnce, detail));
            return true;
        }
        self.postings(&at, event);
        match event {
            AccountEvent::AccountOpened { .. } => {
                self.accounts.entry(stream.to_owned()).or_default().opened = true;
            }
            AccountEvent::FundsDeposited { amount, .. } => self.moved(&at, amount.minor()),
            AccountEvent::PurchaseDebited {
                account_id,
                order_id,
                product_id,
                amount,
            } => {
                self.debited(&at, *order_id, *account_id, product_id, amount.minor());
                self.moved(&at, -amount.minor());
            }
            AccountEvent::PurchaseRefunded {
                order_id, amount, ..
            } => {
                self.refunded(&at, *order_id, amount.minor());
                self.moved(&at, amount.minor());
            }
            AccountEvent::PayoutCredited {
                payout_id, amount, ..
            } => {
                if let Some(first) = self.payouts.insert(*payout_id, position) {
                    let detail = format!("payout {payout_id} first credited at position {first}");
                    self.violations
                        .push(at.violation(Rule::PayoutCreditedTwice, detail));
                }
                self.moved(&at, amount.minor());
            }
            AccountEvent::FundsWithdrawn { amount, .. } => self.moved(&at, -amount.minor()),
        }
        self.violations.len() > before
    }

    /// Violations of the rules that hold at every position, in log order.
    pub fn always_violations(&self) -> Vec<Violation> {
        let mut violations = self.violations.clone();
        for (stream, book) in &self.accounts {
            if book.balance != book.posted {
                let detail = format!(
                    "events' amounts sum to {} but postings to {}",
                    book.balance, book.posted
                );
                violations.push(Violation {
                    rule: Rule::PostingsDisagree,
                    position: book.last_position,
                    stream: stream.clone(),
                    detail,
                });
            }
        }
        violations.sort_by_key(|violation| violation.position);
        violations
    }

    /// Violations once every reservation should be resolved: the rules that
    /// always hold, no reservation pending, every debit confirmed or
    /// refunded, and each product's money conserved.
    pub fn settled_violations(&self) -> Vec<Violation> {
        let mut violations = self.always_violations();
        for (order_id, order) in &self.orders {
            if order.state == OrderState::Pending {
                violations.push(Violation {
                    rule: Rule::StillPending,
                    position: order.reserved_at,
                    stream: order.product_stream.clone(),
                    detail: format!(
                        "order {order_id} reserved {} and never settled",
                        order.amount
                    ),
                });
            }
        }
        for (order_id, debit) in &self.debits {
            let state = self.orders.get(order_id).map(|order| order.state);
            let rule = match state {
                _ if debit.refunded => continue,
                Some(OrderState::Confirmed) => continue,
                Some(OrderState::Released) => Rule::RefundMissing,
                Some(OrderState::Pending) | None => Rule::DebitWithoutConfirmation,
            };
            violations.push(Violation {
                rule,
                position: debit.position,
                stream: debit.stream.clone(),
                detail: format!("order {order_id} debited {} ({state:?})", debit.amount),
            });
        }
        violations.extend(self.money_not_conserved());
        violations.sort_by_key(|violation| violation.position);
        violations
    }

    /// Confirmed quota of a product, summed from its confirmations.
    pub fn confirmed(&self, product_id: &ProductId) -> i64 {
        self.products
            .get(&product_id.stream())
            .map_or(0, |book| book.confirmed)
    }

    /// Quota of a product reserved and not released now, summed from its events.
    pub fn held(&self, product_id: &ProductId) -> i64 {
        self.products
            .get(&product_id.stream())
            .map_or(0, |book| book.held)
    }

    /// The most quota of a product ever reserved and not released at once.
    pub fn held_peak(&self, product_id: &ProductId) -> i64 {
        self.products
            .get(&product_id.stream())
            .map_or(0, |book| book.held_peak)
    }

    /// A product's quota as listed (zero if not listed).
    pub fn quota(&self, product_id: &ProductId) -> i64 {
        self.products
            .get(&product_id.stream())
            .map_or(0, |book| book.quota)
    }

    /// Number of orders of a product confirmed, counted from its confirmations.
    pub fn confirmed_orders(&self, product_id: &ProductId) -> usize {
        let stream = product_id.stream();
        self.orders
            .values()
            .filter(|order| order.product_stream == stream && order.state == OrderState::Confirmed)
            .count()
    }

    /// The highest position observed.
    pub fn head(&self) -> i64 {
        self.head
    }

    fn listed(&self, stream: &str) -> bool {
        self.products
            .get(stream)
            .is_some_and(|book| book.product_id.is_some())
    }

    fn book(&mut self, stream: &str) -> &mut ProductBook {
        self.products
            .get_mut(stream)
            .expect("BUG: checked listed above")
    }

    fn reserved(&mut self, at: &At, order_id: OrderId, account_id: AccountId, amount: i64) {
        if self.orders.contains_key(&order_id) || self.refused.contains_key(&order_id) {
            let detail = format!("order {order_id} already reserved or refused");
            self.violations
                .push(at.violation(Rule::ReservedTwice, detail));
            return;
        }
        let book = self.book(at.stream);
        let (open, min, max) = (book.open, book.min_purchase, book.max_purchase);
        book.held += amount;
        book.held_peak = book.held_peak.max(book.held);
        let (held, quota) = (book.held, book.quota);
        let product_id = book.product_id.clone();
        let mut found = Vec::new();
        if held > quota {
            let detail = format!("{held} reserved and not released, quota {quota}");
            found.push(at.violation(Rule::Oversold, detail));
        }
        if !open {
            let detail = format!("order {order_id} reserved while the sale was closed");
            found.push(at.violation(Rule::ReservedWhileClosed, detail));
        }
        if amount < min || amount > max {
            let detail = format!("order {order_id} reserved {amount}, limits {min} to {max}");
            found.push(at.violation(Rule::ReservationOutOfRange, detail));
        }
        self.violations.extend(found);
        let order = OrderBook {
            product_stream: at.stream.to_owned(),
            product_id,
            account_id,
            amount,
            reserved_at: at.position,
            state: OrderState::Pending,
        };
        self.orders.insert(order_id, order);
    }

    fn settled(
        &mut self,
        at: &At,
        order_id: OrderId,
        account_id: AccountId,
        amount: i64,
        confirmed: bool,
    ) {
        let Some(order) = self.orders.get(&order_id).cloned() else {
            let detail = format!("order {order_id} was never reserved");
            self.violations
                .push(at.violation(Rule::UnknownReservation, detail));
            return;
        };
        if order.product_stream != at.stream {
            let detail = format!("order {order_id} is reserved in {}", order.product_stream);
            self.violations
                .push(at.violation(Rule::UnknownReservation, detail));
            return;
        }
        if order.state != OrderState::Pending {
            let rule = match (confirmed, order.state) {
                (true, OrderState::Confirmed) => Rule::ConfirmedTwice,
                _ => Rule::SettledTwice,
            };
            let detail = format!("order {order_id} is already {:?}", order.state);
            self.violations.push(at.violation(rule, detail));
            return;
        }
        if order.account_id != account_id || order.amount != amount {
            let detail = format!(
                "order {order_id} reserved {} for {}, settled {amount} for {account_id}",
                order.amount, order.account_id
            );
            self.violations
                .push(at.violation(Rule::SettlementMismatch, detail));
        }
        let book = self.book(at.stream);
        if confirmed {
            book.confirmed += order.amount;
        } else {
            book.held -= order.amount;
        }
        let state = if confirmed {
            OrderState::Confirmed
        } else {
            OrderState::Released
        };
        if confirmed && !self.paid(&order_id, &order) {
            let detail = format!(
                "order {order_id} confirmed without an unrefunded debit of {} to {}",
                order.amount, order.account_id
            );
            self.violations
                .push(at.violation(Rule::ConfirmedWithoutDebit, detail));
        }
        self.orders
            .get_mut(&order_id)
            .expect("BUG: read above")
            .state = state;
    }

    /// Whether one unrefunded debit matching the order's reservation is in the log.
    fn paid(&self, order_id: &OrderId, order: &OrderBook) -> bool {
        self.debits.get(order_id).is_some_and(|debit| {
            !debit.refunded
                && debit.account_id == order.account_id
                && debit.amount == order.amount
                && Some(&debit.product_id) == order.product_id.as_ref()
        })
    }

    fn refused(&mut self, at: &At, order_id: OrderId, amount: i64, reason: RefusalReason) {
        if self.orders.contains_key(&order_id) || self.refused.contains_key(&order_id) {
            let detail = format!("order {order_id} already reserved or refused");
            self.violations
                .push(at.violation(Rule::ReservedTwice, detail));
            return;
        }
        self.refused.insert(order_id, at.position);
        let book = self.book(at.stream);
        let left = book.quota - book.held;
        let short = match reason {
            RefusalReason::SoldOut => book.confirmed >= book.quota,
            RefusalReason::InsufficientQuota => amount > left,
            RefusalReason::SaleNotOpen | RefusalReason::AmountOutOfRange => true,
        };
        if !short {
            let detail = format!(
                "order {order_id} of {amount} refused as {reason:?} with {left} left and {} confirmed of {}",
                book.confirmed, book.quota
            );
            self.violations.push(at.violation(Rule::Undersold, detail));
        }
    }

    fn debited(
        &mut self,
        at: &At,
        order_id: OrderId,
        account_id: AccountId,
        product_id: &ProductId,
        amount: i64,
    ) {
        if let Some(first) = self.debits.get(&order_id) {
            let detail = format!(
                "order {order_id} first debited at position {}",
                first.position
            );
            self.violations
                .push(at.violation(Rule::DebitedTwice, detail));
            return;
        }
        match self.orders.get(&order_id) {
            None => {
                let detail = format!("order {order_id} debited {amount} without a reservation");
                self.violations
                    .push(at.violation(Rule::DebitWithoutReservation, detail));
            }
            Some(order)
                if order.account_id != account_id
                    || order.amount != amount
                    || order.product_id.as_ref() != Some(product_id) =>
            {
                let detail = format!(
                    "order {order_id} reserved {} of {} for {}, debited {amount} of {product_id} to {account_id}",
                    order.amount, order.product_stream, order.account_id
                );
                self.violations
                    .push(at.violation(Rule::DebitMismatch, detail));
            }
            Some(_) => {}
        }
        let debit = DebitBook {
            account_id,
            product_id: product_id.clone(),
            amount,
            position: at.position,
            stream: at.stream.to_owned(),
            refunded: false,
        };
        self.debits.insert(order_id, debit);
    }

    fn refunded(&mut self, at: &At, order_id: OrderId, amount: i64) {
        let confirmed = self
            .orders
            .get(&order_id)
            .is_some_and(|order| order.state == OrderState::Confirmed);
        let Some(debit) = self.debits.get_mut(&order_id) else {
            let detail = format!("order {order_id} refunded {amount} but never debited");
            self.violations
                .push(at.violation(Rule::RefundWithoutDebit, detail));
            return;
        };
        if debit.refunded || debit.amount != amount || debit.stream != at.stream {
            let detail = format!(
                "order {order_id} debited {} in {} (refunded: {}), refunded {amount}",
                debit.amount, debit.stream, debit.refunded
            );
            self.violations
                .push(at.violation(Rule::RefundWithoutDebit, detail));
            return;
        }
        debit.refunded = true;
        if confirmed {
            let detail = format!("order {order_id} is confirmed; its debit was refunded");
            self.violations
                .push(at.violation(Rule::RefundOfConfirmed, detail));
        }
    }

    /// Moves an account's balance by the signed amount of one event.
    fn moved(&mut self, at: &At, signed: i64) {
        let book = self.accounts.entry(at.stream.to_owned()).or_default();
        book.balance += i128::from(signed);
        let balance = book.balance;
        if balance < 0 {
            let detail = format!("balance {balance}");
            self.violations
                .push(at.violation(Rule::NegativeBalance, detail));
        }
        if balance > i128::from(i64::MAX) {
            let detail = format!("balance {balance}");
            self.violations
                .push(at.violation(Rule::BalanceOverflow, detail));
        }
    }

    /// Checks an event's postings balance and adds those to the customer's
    /// available account to the stream's posted balance.
    fn postings(&mut self, at: &At, event: &AccountEvent) {
        let postings = event.postings();
        if !postings.is_empty() && !is_balanced(&postings) {
            let detail = format!("{postings:?}");
            self.violations
                .push(at.violation(Rule::UnbalancedPostings, detail));
        }
        let book = self.accounts.entry(at.stream.to_owned()).or_default();
        book.last_position = at.position;
        for posting in &postings {
            if let LedgerAccount::CustomerAvailable { account_id } = posting.account
                && account_id.stream() == at.stream
            {
                book.posted += posting.signed_minor();
            }
        }
    }

    /// Per product: money taken (debits) = money confirmed + money refunded.
    fn money_not_conserved(&self) -> Vec<Violation> {
        let mut taken: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for debit in self.debits.values() {
            let entry = taken.entry(debit.product_id.as_str()).or_default();
            entry.0 += debit.amount;
            if debit.refunded {
                entry.1 += debit.amount;
            }
        }
        let mut violations = Vec::new();
        for (stream, book) in &self.products {
            let Some(product_id) = &book.product_id else {
                continue;
            };
            let (debited, refunded) = taken.remove(product_id.as_str()).unwrap_or_default();
            if debited != book.confirmed + refunded {
                violations.push(Violation {
                    rule: Rule::MoneyNotConserved,
                    position: self.head,
                    stream: stream.clone(),
                    detail: format!(
                        "taken {debited}, confirmed {} + refunded {refunded}",
                        book.confirmed
                    ),
                });
            }
        }
        for (product_id, (debited, refunded)) in taken {
            violations.push(Violation {
                rule: Rule::MoneyNotConserved,
                position: self.head,
                stream: format!("product-{product_id}"),
                detail: format!("taken {debited} for an unlisted product, refunded {refunded}"),
            });
        }
        violations
    }
}

/// Where an event sits.
struct At<'a> {
    position: i64,
    stream: &'a str,
}

impl At<'_> {
    fn violation(&self, rule: Rule, detail: String) -> Violation {
        Violation {
            rule,
            position: self.position,
            stream: self.stream.to_owned(),
            detail,
        }
    }
}

/// The account an account event names.
fn event_account(event: &AccountEvent) -> AccountId {
    match event {
        AccountEvent::AccountOpened { account_id, .. }
        | AccountEvent::FundsDeposited { account_id, .. }
        | AccountEvent::PurchaseDebited { account_id, .. }
        | AccountEvent::PurchaseRefunded { account_id, .. }
        | AccountEvent::PayoutCredited { account_id, .. }
        | AccountEvent::FundsWithdrawn { account_id, .. } => *account_id,
    }
}
