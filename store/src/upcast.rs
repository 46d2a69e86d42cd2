//! Upcasting: stored events of an older shape are brought to the current
//! shape when read, so the domain only ever sees the latest. Each step takes
//! one type from one version to the next; a stored event goes through every
//! step from its version up. The stored row never changes (the log is
//! immutable and hashed).

use serde_json::{Value, json};

/// One step: the type, the version it reads, and how.
struct Step {
    event_type: &'static str,
    from: i32,
    apply: fn(Value) -> Result<Value, String>,
}

/// Every step, oldest first.
const STEPS: &[Step] = &[Step {
    event_type: "account_opened",
    from: 1,
    apply: account_opened_v1_to_v2,
}];

/// `account_opened` v1, from before accounts had a currency: the currency
/// was the platform's, CNY.
fn account_opened_v1_to_v2(mut data: Value) -> Result<Value, String> {
    let object = data
        .as_object_mut()
        .ok_or("account_opened v1 data is not an object")?;
    object.entry("currency").or_insert(json!("CNY"));
    Ok(data)
}

/// The current shape of a stored event's data.
pub fn upcast(event_type: &str, schema_version: i32, data: &Value) -> Result<Value, String> {
    let mut data = data.clone();
    let mut version = schema_version;
    for step in STEPS {
        if step.event_type == event_type && step.from == version {
            data = (step.apply)(data)?;
            version += 1;
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_one_account_openings_get_the_currency_they_implied() {
        let v1 = json!({"account_id": "0195f3a0-0000-7000-8000-000000000001"});
        let v2 = upcast("account_opened", 1, &v1).unwrap();
        assert_eq!(v2["currency"], "CNY");
        // A current event is left alone, whatever its version says.
        let eur = json!({"account_id": "x", "currency": "EUR"});
        assert_eq!(upcast("account_opened", 1, &eur).unwrap(), eur);
        assert_eq!(upcast("account_opened", 2, &v1).unwrap(), v1);
        assert_eq!(upcast("funds_deposited", 1, &v1).unwrap(), v1);
    }
}
