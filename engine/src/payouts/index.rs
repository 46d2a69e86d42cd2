//! The engine's index of payouts with work left: every payout not yet final
//! (or succeeded and not yet credited), folded with the payout decider from
//! the log. It is built once from position zero and then followed from its
//! own position, so a worker's pass reads only what was appended since the
//! last one, never the whole log; a node's workers share one index.
//!
//! The index is a pure function of the log up to its position: a worker
//! decides on a payout's folded state and version and appends with that
//! version expected, so a stale entry (another node moved the payout) is a
//! conflict, never a second call.

use crate::aggregate::decode;
use domain::payout::{Payout, PayoutEvent, PayoutState, PayoutStatus, ScheduledPayout};
use domain::{Decider, PayoutId};
use std::collections::HashMap;
use store::{EventStore, RecordedEvent, StoreError};
use uuid::Uuid;

/// A payout with work left, as the log has it.
#[derive(Debug, Clone)]
pub struct IndexedPayout {
    /// The payout's folded state.
    pub payout: ScheduledPayout,
    /// Its stream's version.
    pub version: i64,
}

/// Payouts with work left, followed from the log.
#[derive(Debug, Default)]
pub struct PayoutIndex {
    position: i64,
    payouts: HashMap<PayoutId, IndexedPayout>,
}

/// Which share of the payouts a worker takes: those whose id falls in its
/// partition, so a node's workers never race one another for a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// This worker's share, `0..count`.
    pub index: u32,
    /// How many shares there are.
    pub count: u32,
}

impl Default for Partition {
    fn default() -> Self {
        Partition { index: 0, count: 1 }
    }
}

impl Partition {
    /// Whether the payout falls in this share.
    pub fn contains(&self, payout_id: PayoutId) -> bool {
        assert!(
            self.count > 0 && self.index < self.count,
            "BUG: partition {self:?}"
        );
        payout_id.0.as_u128() % u128::from(self.count) == u128::from(self.index)
    }
}

impl PayoutIndex {
    /// Folds what the log holds beyond the index's position.
    pub async fn catch_up(&mut self, store: &dyn EventStore) -> Result<(), StoreError> {
        loop {
            let page = store
                .read_all(self.position, store::port::READ_LIMIT_MAX)
                .await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            let last_position = last.position;
            for recorded in &page {
                self.apply(recorded)?;
            }
            self.position = last_position;
        }
    }

    /// The log position folded so far.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// Payouts with work left.
    pub fn len(&self) -> usize {
        self.payouts.len()
    }

    /// Whether no payout has work left.
    pub fn is_empty(&self) -> bool {
        self.payouts.is_empty()
    }

    /// The payouts of one partition with work left (copies).
    pub fn partition(&self, partition: Partition) -> Vec<IndexedPayout> {
        self.payouts
            .iter()
            .filter(|(id, _)| partition.contains(**id))
            .map(|(_, entry)| entry.clone())
            .collect()
    }

    fn apply(&mut self, recorded: &RecordedEvent) -> Result<(), StoreError> {
        if let Some(id) = recorded.stream_id.strip_prefix("payout-") {
            let Ok(uuid) = Uuid::parse_str(id) else {
                return Ok(());
            };
            let event = decode::<Payout>(recorded)?;
            self.apply_payout_event(PayoutId(uuid), recorded.version, &event);
        } else if recorded.event_type == "payout_credited"
            && let Some(payout_id) = recorded
                .data
                .get("payout_id")
                .and_then(|v| v.as_str())
                .and_then(|v| Uuid::parse_str(v).ok())
        {
            let payout_id = PayoutId(payout_id);
            // Credited after its success: nothing is left to do.
            if self
                .payouts
                .get(&payout_id)
                .is_some_and(|entry| entry.payout.status == PayoutStatus::Succeeded)
            {
                self.payouts.remove(&payout_id);
            }
        }
        Ok(())
    }

    fn apply_payout_event(&mut self, payout_id: PayoutId, version: i64, event: &PayoutEvent) {
        let state = match event {
            PayoutEvent::PayoutScheduled { .. } => PayoutState::default(),
            _ => match self.payouts.remove(&payout_id) {
                Some(entry) => {
                    assert_eq!(
                        version,
                        entry.version + 1,
                        "BUG: payout stream versions not contiguous in the log"
                    );
                    PayoutState {
                        payout: Some(entry.payout),
                    }
                }
                // Final already (failed, cancelled, or succeeded and
                // credited): a final payout takes no more events.
                None => return,
            },
        };
        let state = Payout::evolve(state, event);
        let payout = state
            .payout
            .expect("BUG: a scheduled payout stays scheduled");
        if matches!(
            payout.status,
            PayoutStatus::Failed | PayoutStatus::Cancelled
        ) {
            return;
        }
        self.payouts
            .insert(payout_id, IndexedPayout { payout, version });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_every_id_once() {
        let count = 3;
        for n in 0..300u128 {
            let id = PayoutId(Uuid::from_u128(n * 7_919));
            let owners = (0..count)
                .filter(|index| {
                    Partition {
                        index: *index,
                        count,
                    }
                    .contains(id)
                })
                .count();
            assert_eq!(owners, 1);
        }
    }
}
