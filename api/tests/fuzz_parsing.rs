//! Fuzzing request parsing (proptest): any bytes, any JSON, any shape sent
//! as a request body is either accepted as a well-formed request or refused
//! with a 400/413 error; nothing panics, and nothing accepted breaks the
//! rules the handlers rely on.

use api::server::error::ApiError;
use api::server::model::{
    CreateProductRequest, CreateUserRequest, DepositRequest, LoginRequest, PurchaseRequest,
    SchedulePayoutsRequest, parse_json,
};
use axum::http::StatusCode;
use proptest::prelude::*;
use serde_json::{Value, json};

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::hash_map(
                prop_oneof![
                    Just("amount".to_owned()),
                    Just("reference".to_owned()),
                    Just("username".to_owned()),
                    Just("password".to_owned()),
                    Just("role".to_owned()),
                    Just("period".to_owned()),
                    Just("kind".to_owned()),
                    ".{0,12}".prop_map(String::from),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A refusal is a 400 `invalid_request`: never a 5xx, never another code.
/// (413 is the size limit, which `JsonBody` applies before parsing; the
/// hostile-input tests in `api.rs` send bodies over it.)
fn refused_as_bad_request<T>(parsed: Result<T, ApiError>) -> Result<(), TestCaseError> {
    if let Err(error) = parsed {
        prop_assert_eq!(
            error.status_and_code(),
            (StatusCode::BAD_REQUEST, "invalid_request")
        );
    }
    Ok(())
}

fn parse_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    refused_as_bad_request(parse_json::<PurchaseRequest>(bytes))?;
    refused_as_bad_request(parse_json::<DepositRequest>(bytes))?;
    refused_as_bad_request(parse_json::<LoginRequest>(bytes))?;
    refused_as_bad_request(parse_json::<CreateUserRequest>(bytes))?;
    refused_as_bad_request(parse_json::<CreateProductRequest>(bytes))?;
    refused_as_bad_request(parse_json::<SchedulePayoutsRequest>(bytes))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        parse_all(&bytes)?;
        // Bytes that are not a JSON object are refused by every request type.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            prop_assert!(parse_json::<PurchaseRequest>(&bytes).is_err());
            prop_assert!(parse_json::<LoginRequest>(&bytes).is_err());
        }
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        parse_all(&bytes)?;
        // An accepted purchase has exactly its one field, an integer.
        if let Ok(purchase) = parse_json::<PurchaseRequest>(&bytes) {
            prop_assert_eq!(value, json!({"amount": purchase.amount}));
        }
    }
}
