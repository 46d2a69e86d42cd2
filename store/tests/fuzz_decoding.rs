//! Fuzzing event decoding (proptest): whatever a stored row holds (any
//! type name, schema version and data), decoding into each domain event type
//! and upcasting answer Ok or an error; nothing panics.

use chrono::Utc;
use domain::account::AccountEvent;
use domain::payout::PayoutEvent;
use domain::product::ProductEvent;
use proptest::prelude::*;
use serde_json::{Value, json};
use store::{Metadata, RecordedEvent, codec};
use uuid::Uuid;

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        Just(json!("0195f3a0-0000-7000-8000-000000000001")),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::hash_map(
                prop_oneof![
                    Just("account_id".to_owned()),
                    Just("amount".to_owned()),
                    Just("currency".to_owned()),
                    Just("order_id".to_owned()),
                    Just("reference".to_owned()),
                    ".{0,10}".prop_map(String::from),
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn event_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("account_opened".to_owned()),
        Just("funds_deposited".to_owned()),
        Just("quota_reserved".to_owned()),
        Just("payout_scheduled".to_owned()),
        "[a-z_]{0,20}".prop_map(String::from),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_stored_row_decodes_or_is_refused(
        event_type in event_type(),
        schema_version in -2i32..5,
        data in any_json(),
    ) {
        let recorded = RecordedEvent {
            position: 1,
            stream_id: "s".into(),
            version: 1,
            event_id: Uuid::nil(),
            event_type,
            schema_version,
            data,
            metadata: Metadata::default(),
            recorded_at: Utc::now(),
            hash: None,
        };
        let _ = codec::decode::<AccountEvent>(&recorded);
        let _ = codec::decode::<ProductEvent>(&recorded);
        let _ = codec::decode::<PayoutEvent>(&recorded);
        let _ = store::upcast::upcast(&recorded.event_type, recorded.schema_version, &recorded.data);
    }
}
