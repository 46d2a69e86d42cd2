//! Reading your own writes (API.md, "Additions (v1.1)"): every write that
//! appended answers the log position it reached, and a read of a read model
//! given `min_position=<position>` answers only once the read models it
//! reads have reached that position, waiting at most
//! `MIN_POSITION_WAIT_MAX`, else 503 `stale` with `Retry-After`.
//!
//! The route table declares which projections each read route reads
//! (`routes::RouteSpec::reads`); the guard takes `min_position` out of the
//! query (so handlers never see it) and waits here before the handler runs.

use super::AppState;
use super::error::ApiError;
use projections::Projection;
use std::time::Duration;
use tokio::time::Instant;

/// The query parameter.
pub const MIN_POSITION_PARAM: &str = "min_position";
/// The longest a read waits for its read models to reach `min_position`.
pub const MIN_POSITION_WAIT_MAX: Duration = Duration::from_secs(2);
/// How often the projections' in-memory checkpoints are looked at while
/// waiting (the runner updates them after each of its commits).
pub const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How often the database's checkpoints are read while waiting: another
/// node's runner may be the one applying the events.
pub const CHECKPOINT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// `Retry-After` seconds of a 503 `stale`.
pub const STALE_RETRY_AFTER_SECONDS: u64 = 1;

/// Splits `min_position` off a query string: its value, if given, and the
/// query without it (the other pairs kept byte for byte, in order).
pub fn take_min_position(query: &str) -> Result<(Option<i64>, String), ApiError> {
    let mut min_position = None;
    let mut rest: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let Some((key, value)) = form_urlencoded::parse(pair.as_bytes()).next() else {
            rest.push(pair);
            continue;
        };
        if key != MIN_POSITION_PARAM {
            rest.push(pair);
            continue;
        }
        if min_position.is_some() {
            return Err(ApiError::InvalidRequest(
                "min_position is given more than once".into(),
            ));
        }
        let position = value
            .parse::<i64>()
            .ok()
            .filter(|position| *position >= 0)
            .ok_or_else(|| {
                ApiError::InvalidRequest(
                    "min_position must be a log position (an integer, 0 or more)".into(),
                )
            })?;
        min_position = Some(position);
    }
    Ok((min_position, rest.join("&")))
}

/// Waits until every one of `projections` has reached `min_position`;
/// 503 `stale` when they have not within `MIN_POSITION_WAIT_MAX`. A
/// position beyond the log's head is 400 at once: a write answers only
/// once it committed, so no write's position is ever beyond the head, and
/// such a position is made up (waiting for it would only hold a request).
pub async fn wait_for(
    state: &AppState,
    projections: &[Projection],
    min_position: i64,
) -> Result<(), ApiError> {
    let reached_in_memory = || {
        projections
            .iter()
            .all(|projection| state.statuses.position(*projection) >= min_position)
    };
    if reached_in_memory() {
        return Ok(());
    }
    let head = state.store.head().await?;
    if min_position > head {
        return Err(ApiError::InvalidRequest(format!(
            "min_position {min_position} is beyond the log's head ({head}): no write reached it"
        )));
    }
    let deadline = Instant::now() + MIN_POSITION_WAIT_MAX;
    let mut next_checkpoint_read = Instant::now();
    loop {
        if reached_in_memory() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= next_checkpoint_read {
            if reached_in_database(state, projections, min_position).await? {
                return Ok(());
            }
            next_checkpoint_read = now + CHECKPOINT_POLL_INTERVAL;
        }
        if Instant::now() >= deadline {
            metrics::counter!("ledger_stale_reads_total").increment(1);
            return Err(ApiError::Stale(STALE_RETRY_AFTER_SECONDS));
        }
        tokio::time::sleep_until((Instant::now() + STATUS_POLL_INTERVAL).min(deadline)).await;
    }
}

async fn reached_in_database(
    state: &AppState,
    projections: &[Projection],
    min_position: i64,
) -> Result<bool, ApiError> {
    for projection in projections {
        let checkpoint = state.db.checkpoint(*projection).await?;
        if checkpoint.is_none_or(|checkpoint| checkpoint.position < min_position) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(query: &str) -> (Option<i64>, String) {
        take_min_position(query).unwrap_or_else(|e| panic!("{query}: {e:?}"))
    }

    #[test]
    fn min_position_is_taken_out_and_the_rest_kept() {
        assert_eq!(split(""), (None, String::new()));
        assert_eq!(split("after=3&limit=2"), (None, "after=3&limit=2".into()));
        assert_eq!(split("min_position=42"), (Some(42), String::new()));
        assert_eq!(
            split("after=3&min_position=0&limit=2"),
            (Some(0), "after=3&limit=2".into())
        );
        // An encoded name is still the parameter.
        assert_eq!(
            split("min%5Fposition=7&q=a%20b"),
            (Some(7), "q=a%20b".into())
        );
    }

    #[test]
    fn bad_min_positions_are_refused() {
        for bad in [
            "min_position=",
            "min_position=-1",
            "min_position=abc",
            "min_position=1.5",
            "min_position=99999999999999999999",
            "min_position=1&min_position=2",
        ] {
            assert!(
                matches!(take_min_position(bad), Err(ApiError::InvalidRequest(_))),
                "{bad}"
            );
        }
    }
}
