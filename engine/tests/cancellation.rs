//! A caller's future dropped mid-append (a client that hangs up, a payout
//! worker aborted) must leave the account book as the log has it: a
//! decision that never committed is never taken for one that did.

mod support;

use async_trait::async_trait;
use domain::AccountId;
use domain::account::{AccountCommand, AccountRejection};
use engine::{CommandError, Engine, EngineSettings, SystemClock};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use store::{AppendHook, EventStore, MemoryEventStore, StoreError};
use support::{amount, funded_account, operator};
use tokio::sync::Notify;
use uuid::Uuid;

/// Holds account appends before their commit while armed.
struct Hold {
    armed: AtomicBool,
    entered: Notify,
}

#[async_trait]
impl AppendHook for Hold {
    async fn before_commit(&self, streams: &[&str]) -> Result<(), StoreError> {
        if self.armed.load(Ordering::SeqCst) && streams.iter().any(|s| s.starts_with("account-")) {
            self.entered.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

fn deposit(minor: i64, reference: &str) -> AccountCommand {
    AccountCommand::Deposit {
        amount: amount(minor),
        reference: reference.into(),
    }
}

fn withdraw(minor: i64, reference: &str) -> AccountCommand {
    AccountCommand::Withdraw {
        amount: amount(minor),
        reference: reference.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposit_dropped_before_its_commit_is_neither_spendable_nor_skipped() {
    let hold = Arc::new(Hold {
        armed: AtomicBool::new(false),
        entered: Notify::new(),
    });
    let log = MemoryEventStore::new();
    let store: Arc<dyn EventStore> = Arc::new(log.with_hook(hold.clone()));
    let engine = Engine::new(
        store.clone(),
        Arc::new(SystemClock),
        EngineSettings::default(),
    );
    let account_id = AccountId(Uuid::from_u128(7));
    funded_account(&engine, account_id, 1_000).await;

    // The deposit is decided and its append is under way when the caller
    // goes away: the transaction never commits.
    hold.armed.store(true, Ordering::SeqCst);
    let caller = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .account_command(account_id, deposit(5_000, "wire-2"), operator())
                .await
        }
    });
    hold.entered.notified().await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    hold.armed.store(false, Ordering::SeqCst);

    let stream = store
        .read_stream_to_end(&account_id.stream())
        .await
        .unwrap();
    assert!(
        stream
            .iter()
            .all(|e| e.event_type != "funds_deposited" || e.data["reference"] != "wire-2"),
        "the dropped deposit is not in the log"
    );
    let (state, version) = engine.account(account_id).await.unwrap();
    assert_eq!(version, stream.last().unwrap().version);
    assert_eq!(
        state.account.as_ref().unwrap().available,
        amount(1_000),
        "the book holds what the log holds"
    );

    // Spending the deposit that never committed is refused...
    let spend = engine
        .account_command(account_id, withdraw(5_500, "out-1"), operator())
        .await;
    assert!(
        matches!(
            spend,
            Err(CommandError::Account(
                AccountRejection::InsufficientFunds { .. }
            ))
        ),
        "{spend:?}"
    );
    // ...and asking for it again deposits it, once.
    let again = engine
        .account_command(account_id, deposit(5_000, "wire-2"), operator())
        .await
        .unwrap();
    assert!(again.is_some(), "the repeated deposit was appended");
    let stream = store
        .read_stream_to_end(&account_id.stream())
        .await
        .unwrap();
    let deposits: Vec<i64> = stream
        .iter()
        .filter(|e| e.event_type == "funds_deposited")
        .map(|e| e.data["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(deposits, vec![1_000, 5_000]);
    let (state, _) = engine.account(account_id).await.unwrap();
    assert_eq!(state.account.unwrap().available, amount(6_000));
}
