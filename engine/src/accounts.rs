//! The account book: customer accounts kept in memory, decided in batches,
//! appended in one multi-stream transaction, fenced by stream versions.
//!
//! Each account has its own async lock; a batch locks its accounts in id
//! order (so two batches can never deadlock), decides every job against the
//! cached state, and appends one stream per account in one transaction. A
//! conflicting account (another process wrote it) is reloaded and decided
//! again without sinking the others. A refusal decided on the cache is
//! confirmed against the store first, so a deposit made elsewhere is seen.

use crate::aggregate::{Loaded, encode_all, expected_after};
use crate::context::RequestContext;
use crate::error::CommandError;
use crate::stats::EngineStats;
use chrono::{DateTime, Utc};
use domain::account::{
    AccountCommand, AccountEvent, AccountRejection, AccountState, CustomerAccount,
};
use domain::{AccountId, Decider};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use store::{Appended, EventStore, StoreError, StreamAppend, StreamOutcome};
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

/// Most decide-and-append rounds one batch or command makes before giving up
/// on accounts that keep conflicting.
pub const ACCOUNT_ROUNDS_MAX: usize = 8;

/// One command for one account within a batch.
#[derive(Debug, Clone)]
pub struct AccountJob {
    /// The account.
    pub account_id: AccountId,
    /// What to do.
    pub command: AccountCommand,
    /// The business process (order or payout) it belongs to.
    pub correlation_id: Option<Uuid>,
    /// Who asked.
    pub context: RequestContext,
}

/// What became of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// Applied now, or already applied before (idempotent).
    Done,
    /// The account refused.
    Rejected(AccountRejection),
    /// The store failed or the account kept conflicting; the job may be retried.
    Unavailable(String),
}

#[derive(Default)]
struct AccountEntry {
    loaded: Option<Loaded<AccountState>>,
}

impl AccountEntry {
    async fn ensure_loaded(
        &mut self,
        store: &dyn EventStore,
        account_id: AccountId,
    ) -> Result<&mut Loaded<AccountState>, StoreError> {
        if self.loaded.is_none() {
            let mut fresh = Loaded::default();
            fresh
                .catch_up::<CustomerAccount>(store, &account_id.stream())
                .await?;
            self.loaded = Some(fresh);
        }
        Ok(self.loaded.as_mut().expect("BUG: loaded above"))
    }
}

/// Customer accounts cached in memory, shared by every product writer.
pub struct AccountBook {
    store: Arc<dyn EventStore>,
    stats: Arc<EngineStats>,
    entries: Mutex<HashMap<AccountId, Arc<tokio::sync::Mutex<AccountEntry>>>>,
}

impl AccountBook {
    /// An empty book over a store.
    pub fn new(store: Arc<dyn EventStore>, stats: Arc<EngineStats>) -> AccountBook {
        AccountBook {
            store,
            stats,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entry(&self, account_id: AccountId) -> Arc<tokio::sync::Mutex<AccountEntry>> {
        let mut entries = self.entries.lock().expect("BUG: account book poisoned");
        entries.entry(account_id).or_default().clone()
    }

    /// Locks accounts in id order, so concurrent batches cannot deadlock.
    async fn lock_sorted(
        &self,
        ids: impl IntoIterator<Item = AccountId>,
    ) -> BTreeMap<AccountId, OwnedMutexGuard<AccountEntry>> {
        let sorted: std::collections::BTreeSet<AccountId> = ids.into_iter().collect();
        let mut guards = BTreeMap::new();
        for id in sorted {
            guards.insert(id, self.entry(id).lock_owned().await);
        }
        guards
    }

    /// The account's current state, loaded if needed (a clone, for reads).
    pub async fn state(&self, account_id: AccountId) -> Result<(AccountState, i64), StoreError> {
        let mut guard = self.entry(account_id).lock_owned().await;
        let loaded = guard.ensure_loaded(self.store.as_ref(), account_id).await?;
        loaded
            .catch_up::<CustomerAccount>(self.store.as_ref(), &account_id.stream())
            .await?;
        Ok((loaded.state.clone(), loaded.version))
    }

    /// Runs one command on one account; returns the append, or `None` when the
    /// command was already satisfied.
    pub async fn execute(
        &self,
        job: AccountJob,
        now: DateTime<Utc>,
    ) -> Result<Option<Appended>, CommandError> {
        let stream = job.account_id.stream();
        let mut outcome = self.execute_batch(vec![job], now).await;
        match outcome.pop().expect("BUG: one outcome per job") {
            (JobOutcome::Done, appended) => Ok(appended),
            (JobOutcome::Rejected(rejection), _) => Err(CommandError::Account(rejection)),
            (JobOutcome::Unavailable(_), _) => Err(CommandError::Contention(stream)),
        }
    }

    /// Decides and appends many jobs over many accounts in as few
    /// transactions as conflicts allow. Outcomes are in job order, each with
    /// its account's append when that account wrote something.
    pub async fn execute_batch(
        &self,
        jobs: Vec<AccountJob>,
        now: DateTime<Utc>,
    ) -> Vec<(JobOutcome, Option<Appended>)> {
        let mut guards = self.lock_sorted(jobs.iter().map(|j| j.account_id)).await;
        let mut by_account: BTreeMap<AccountId, Vec<usize>> = BTreeMap::new();
        for (index, job) in jobs.iter().enumerate() {
            by_account.entry(job.account_id).or_default().push(index);
        }
        let mut outcomes: Vec<Option<(JobOutcome, Option<Appended>)>> = vec![None; jobs.len()];
        let mut refreshed = HashSet::new();
        let mut last_error = String::from("accounts kept conflicting");
        for _round in 0..ACCOUNT_ROUNDS_MAX {
            let undecided: Vec<AccountId> = by_account
                .iter()
                .filter(|(_, indexes)| outcomes[indexes[0]].is_none())
                .map(|(id, _)| *id)
                .collect();
            if undecided.is_empty() {
                break;
            }
            let mut appends = Vec::new();
            // The states decided on, out of the cache until their append
            // commits (see `decide_account`).
            let mut tentative: BTreeMap<AccountId, Tentative> = BTreeMap::new();
            for account_id in undecided {
                let guard = guards.get_mut(&account_id).expect("BUG: locked above");
                let indexes = &by_account[&account_id];
                match self
                    .decide_account(guard, account_id, indexes, &jobs, now, &mut refreshed)
                    .await
                {
                    Ok(Decided::Retry) => {}
                    Ok(Decided::Final(results)) => {
                        for (index, outcome) in results {
                            outcomes[index] = Some((outcome, None));
                        }
                    }
                    Ok(Decided::Append(decided)) => {
                        let ToAppend {
                            append,
                            loaded,
                            results,
                        } = *decided;
                        appends.push(append);
                        tentative.insert(account_id, (loaded, results));
                    }
                    Err(error) => {
                        last_error = error.to_string();
                    }
                }
            }
            if appends.is_empty() {
                continue;
            }
            match self.store.append_batch(appends).await {
                Ok(results) => {
                    for ((account_id, (mut loaded, results)), outcome) in
                        tentative.into_iter().zip(results)
                    {
                        match outcome {
                            StreamOutcome::Appended(appended) => {
                                loaded.version = appended.last_version;
                                let guard = guards.get_mut(&account_id).expect("BUG: locked above");
                                guard.loaded = Some(loaded);
                                for (index, outcome) in results {
                                    outcomes[index] = Some((outcome, Some(appended.clone())));
                                }
                            }
                            // Another process wrote this account: its cache
                            // stays empty, so it is reloaded and decided again.
                            StreamOutcome::Conflict(_) => {
                                EngineStats::bump(&self.stats.account_conflicts);
                            }
                        }
                    }
                }
                Err(error) => {
                    // The outcome is unknown: every account written has an
                    // empty cache (its decided state is dropped here), so it
                    // is reloaded and decided again; the account decider is
                    // idempotent per order.
                    last_error = error.to_string();
                    EngineStats::bump(&self.stats.append_failures);
                    if !error.is_transient() {
                        tracing::warn!(%error, "account batch append failed");
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| (JobOutcome::Unavailable(last_error.clone()), None))
            })
            .collect()
    }

    /// Decides one account's jobs in order against its cached state.
    ///
    /// The state is taken out of the cache while it is decided on and
    /// handed back with the append: the caller puts it back only once the
    /// append committed. Dropped anywhere in between (a failed append, a
    /// conflict, or the caller's future cancelled, as a client that hangs
    /// up or an aborted worker does), the cache is left empty and the
    /// account is reloaded from the log, so a decision that never reached
    /// the log can never be taken for one that did.
    async fn decide_account(
        &self,
        guard: &mut AccountEntry,
        account_id: AccountId,
        indexes: &[usize],
        jobs: &[AccountJob],
        now: DateTime<Utc>,
        refreshed: &mut HashSet<AccountId>,
    ) -> Result<Decided, StoreError> {
        let stream = account_id.stream();
        let mut loaded = match guard.loaded.take() {
            Some(loaded) => loaded,
            None => {
                let mut fresh = Loaded::default();
                fresh
                    .catch_up::<CustomerAccount>(self.store.as_ref(), &stream)
                    .await?;
                fresh
            }
        };
        let version_before = loaded.version;
        let mut results = Vec::with_capacity(indexes.len());
        let mut new_events = Vec::new();
        let mut rejected = false;
        for &index in indexes {
            let job = &jobs[index];
            match CustomerAccount::decide(&loaded.state, &job.command, now) {
                Ok(events) => {
                    for event in &events {
                        loaded.state =
                            CustomerAccount::evolve(std::mem::take(&mut loaded.state), event);
                    }
                    let metadata = job.context.metadata(job.correlation_id, None);
                    new_events.extend(encode_all::<AccountEvent>(&events, &metadata));
                    results.push((index, JobOutcome::Done));
                }
                Err(rejection) => {
                    rejected = true;
                    results.push((index, JobOutcome::Rejected(rejection)));
                }
            }
        }
        // A refusal may rest on a stale cache (a deposit through another
        // process): look at the store once before making it final.
        if rejected && refreshed.insert(account_id) {
            if !new_events.is_empty() {
                // Decided on: dropped, reloaded next round.
                return Ok(Decided::Retry);
            }
            let moved = loaded
                .catch_up::<CustomerAccount>(self.store.as_ref(), &stream)
                .await?;
            guard.loaded = Some(loaded);
            if moved {
                return Ok(Decided::Retry);
            }
            return Ok(Decided::Final(results));
        }
        if new_events.is_empty() {
            guard.loaded = Some(loaded);
            return Ok(Decided::Final(results));
        }
        let append = StreamAppend {
            stream_id: stream,
            expected: expected_after(version_before),
            events: new_events,
        };
        Ok(Decided::Append(Box::new(ToAppend {
            append,
            loaded,
            results,
        })))
    }
}

/// A state decided on (out of the cache) and the outcomes that hold if its
/// append commits.
type Tentative = (Loaded<AccountState>, Vec<(usize, JobOutcome)>);

/// What `Decided::Append` writes, with the state and outcomes it makes hold.
struct ToAppend {
    append: StreamAppend,
    loaded: Loaded<AccountState>,
    results: Vec<(usize, JobOutcome)>,
}

enum Decided {
    /// Decide this account again next round.
    Retry,
    /// Nothing to write: these outcomes are final.
    Final(Vec<(usize, JobOutcome)>),
    /// Write this; the state (decided on, out of the cache) and the
    /// outcomes hold if it is appended (boxed: the other variants are small).
    Append(Box<ToAppend>),
}
