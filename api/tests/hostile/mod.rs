//! Hostile request bodies shared by the in-process hostile-input test and
//! the fault suite's run against the real binary: injection strings,
//! oversized, deeply nested and malformed bodies, huge, negative and zero
//! amounts, unicode tricks and wrong content types.

/// An order id no order has.
pub const NO_SUCH_ORDER: &str = "0195f3a0-0000-7000-8000-0000000000aa";

/// `(content type, body)` pairs, each sent to every route.
pub fn bodies() -> Vec<(&'static str, String)> {
    let json = "application/json";
    let nested = format!("{}1{}", "{\"a\":".repeat(200), "}".repeat(200));
    let oversized = format!("{{\"amount\":1,\"pad\":\"{}\"}}", "x".repeat(70_000));
    vec![
        (json, r#"{"amount":"1; DROP TABLE events; --"}"#.into()),
        (
            json,
            r#"{"username":"admin' OR '1'='1","password":"' OR 1=1 --"}"#.into(),
        ),
        (json, r#"{"amount":-100,"reference":"neg"}"#.into()),
        (json, r#"{"amount":0,"reference":"zero"}"#.into()),
        (json, r#"{"amount":1e308,"reference":"huge"}"#.into()),
        (json, r#"{"amount":18446744073709551616}"#.into()),
        (
            json,
            "{\"name\":\"\u{202e}evil\u{0000}\",\"quota\":-1}".into(),
        ),
        (json, "{\"amount\":".into()),
        (json, nested),
        (json, oversized),
        ("text/plain", "amount=100".into()),
        (
            "application/x-www-form-urlencoded",
            "amount=100&reference=x".into(),
        ),
    ]
}

/// A route's path with its parameters filled in.
pub fn concrete(path: &str, account: &str, product: &str) -> String {
    path.replace("{account_id}", account)
        .replace("{order_id}", NO_SUCH_ORDER)
        .replace("{product_id}", product)
}
