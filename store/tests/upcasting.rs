//! Events stored in an older shape (fixtures written as the old code wrote
//! them) are read back in the current shape, on SQLite and PostgreSQL, and
//! their stored rows stay as they were (the hash chain still verifies).

use domain::account::{AccountEvent, AccountState, CustomerAccount};
use domain::{Amount, Currency, Decider};
use store::testing::{TestPostgres, TestSqlite};
use store::{EventStore, ExpectedVersion, Metadata, NewEvent, codec};
use uuid::Uuid;

const FIXTURE: &str = include_str!("fixtures/account_opened_v1.json");

async fn load_fixture_and_read_back(store: &dyn EventStore) {
    let fixture: Vec<serde_json::Value> = serde_json::from_str(FIXTURE).unwrap();
    let stream = fixture[0]["stream"].as_str().unwrap();
    let events = fixture
        .iter()
        .map(|row| NewEvent {
            event_id: Uuid::now_v7(),
            event_type: row["type"].as_str().unwrap().to_owned(),
            schema_version: row["schema_version"].as_i64().unwrap() as i32,
            data: row["data"].clone(),
            metadata: Metadata::default(),
        })
        .collect();
    store
        .append(stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    let stored = store.read_stream_to_end(stream).await.unwrap();
    assert_eq!(stored[0].schema_version, 1);
    assert!(
        stored[0].data.get("currency").is_none(),
        "the stored row is untouched"
    );
    let decoded: Vec<AccountEvent> = stored.iter().map(|e| codec::decode(e).unwrap()).collect();
    let AccountEvent::AccountOpened { currency, .. } = &decoded[0] else {
        panic!("{decoded:?}");
    };
    assert_eq!(*currency, Currency::CNY);
    let state = decoded
        .iter()
        .fold(AccountState::default(), CustomerAccount::evolve);
    assert_eq!(state.account.unwrap().available, Amount::new(5000).unwrap());
    // Events written today carry the current version.
    let current = codec::encode(
        &AccountEvent::AccountOpened {
            account_id: domain::AccountId(Uuid::from_u128(7)),
            currency: Currency::CNY,
        },
        Uuid::now_v7(),
        Metadata::default(),
    );
    assert_eq!(current.schema_version, 2);
    assert!(store.verify_chain(&|_| {}).await.unwrap().ok);
}

#[tokio::test]
async fn old_account_openings_are_upcast_on_sqlite() {
    let database = TestSqlite::create().await.unwrap();
    load_fixture_and_read_back(&database.store).await;
}

#[tokio::test]
async fn old_account_openings_are_upcast_on_postgres() {
    let Some(database) = TestPostgres::create("upcasting").await else {
        return;
    };
    load_fixture_and_read_back(&database.store().await).await;
}
