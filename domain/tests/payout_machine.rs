//! The payout state machine against a provider that pays or not, answers
//! truthfully or ambiguously, and workers that send any command at any time
//! (stale, duplicated, out of order). Whatever the schedule, the provider
//! pays at most once, and a payout ends succeeded exactly when it paid.
//! Interest rounding keeps every remainder.

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::payout::{
    INTEREST_DENOMINATOR, PAYOUT_ATTEMPTS_MAX, Payout, PayoutCommand, PayoutEvent, PayoutKind,
    PayoutState, PayoutStatus, ProviderFinding, interest_for,
};
use domain::{AccountId, Amount, Decider, PayoutId, ProductId};
use proptest::prelude::*;
use uuid::Uuid;

/// What the world does next.
#[derive(Debug, Clone)]
enum Step {
    /// A worker tries to claim an attempt and, if it gets it, calls the
    /// provider: `pays` says whether the provider pays, `answer` what the
    /// worker hears (0: the truth, 1: a timeout, 2: a 5xx, 3: nothing,
    /// because it crashed before recording anything). A payment behind an
    /// ambiguous answer lands `lands_after` seconds later, within the
    /// claim's 30 s lease.
    Attempt {
        pays: bool,
        answer: u8,
        lands_after: i64,
    },
    /// Time passes.
    Wait { seconds: i64 },
    /// A worker asks the provider about the key and records the truth.
    Reconcile,
    /// A stale worker records an outcome it thinks it saw.
    StaleSucceeded,
    /// A stale worker records an ambiguous outcome.
    StaleUnknown,
    /// Time passes; a worker expires an old claim.
    Expire { minutes: i64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<bool>(), 0u8..4, 0i64..=30).prop_map(|(pays, answer, lands_after)| Step::Attempt {
            pays,
            answer,
            lands_after
        }),
        (0i64..40).prop_map(|seconds| Step::Wait { seconds }),
        Just(Step::Reconcile),
        Just(Step::StaleSucceeded),
        Just(Step::StaleUnknown),
        (0i64..3).prop_map(|minutes| Step::Expire { minutes }),
    ]
}

struct World {
    state: PayoutState,
    now: DateTime<Utc>,
    /// When each payment the provider made becomes visible to lookups.
    payments_landing: Vec<DateTime<Utc>>,
    payments: u32,
    events: Vec<PayoutEvent>,
}

impl World {
    fn apply(&mut self, command: PayoutCommand) -> bool {
        match Payout::decide(&self.state, &command, self.now) {
            Ok(events) => {
                for event in events {
                    self.state = Payout::evolve(std::mem::take(&mut self.state), &event);
                    self.events.push(event);
                }
                true
            }
            Err(_) => false,
        }
    }

    fn attempt(&self) -> u32 {
        self.state.payout.as_ref().unwrap().attempts
    }

    /// What a lookup answers now: a payment still landing is not seen yet.
    fn truth(&self) -> ProviderFinding {
        if self.payments_landing.iter().any(|t| *t <= self.now) {
            ProviderFinding::Paid {
                provider_ref: "pay-1".into(),
            }
        } else {
            ProviderFinding::NotFound
        }
    }

    fn status(&self) -> PayoutStatus {
        self.state.payout.as_ref().unwrap().status
    }
}

fn scheduled_world() -> World {
    let mut world = World {
        state: PayoutState::default(),
        now: Utc.with_ymd_and_hms(2026, 11, 27, 0, 0, 0).unwrap(),
        payments_landing: Vec::new(),
        payments: 0,
        events: Vec::new(),
    };
    assert!(world.apply(PayoutCommand::Schedule {
        payout_id: PayoutId(Uuid::from_u128(1)),
        product_id: ProductId::parse("p").unwrap(),
        account_id: AccountId(Uuid::from_u128(2)),
        period: "2026-Q4".into(),
        kind: PayoutKind::Interest,
        amount: Amount::new(100).unwrap(),
        currency: domain::Currency::CNY,
    }));
    world
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_provider_pays_at_most_once_and_success_means_paid(
        steps in proptest::collection::vec(step(), 1..60)
    ) {
        let mut world = scheduled_world();
        for step in steps {
            match step {
                Step::Attempt { pays, answer, lands_after } => {
                    let lease_until = world.now + Duration::seconds(30);
                    if world.apply(PayoutCommand::Attempt { lease_until }) {
                        // Only a claimed attempt reaches the provider.
                        let attempt = world.attempt();
                        if pays {
                            world.payments += 1;
                            let delay = if answer == 0 { 0 } else { lands_after };
                            world.payments_landing.push(world.now + Duration::seconds(delay));
                        }
                        let heard = match (answer, pays) {
                            (0, true) => PayoutCommand::RecordSucceeded { attempt, provider_ref: "pay-1".into() },
                            (0, false) => PayoutCommand::RecordFailed { attempt, reason: "declined".into() },
                            (1, _) => PayoutCommand::RecordUnknown { attempt, detail: "timeout".into() },
                            (2, _) => PayoutCommand::RecordUnknown { attempt, detail: "500".into() },
                            _ => continue, // Crashed: the claim stays in flight.
                        };
                        world.apply(heard);
                    }
                }
                Step::Wait { seconds } => world.now += Duration::seconds(seconds),
                Step::Reconcile => {
                    let finding = world.truth();
                    world.apply(PayoutCommand::Reconcile { finding });
                }
                Step::StaleSucceeded => {
                    // A worker whose claim was expired meanwhile may only
                    // report what it really saw: it saw a payment only if
                    // there was one.
                    if world.payments > 0 {
                        let attempt = world.attempt().saturating_sub(1);
                        world.apply(PayoutCommand::RecordSucceeded { attempt, provider_ref: "pay-1".into() });
                    }
                }
                Step::StaleUnknown => {
                    let attempt = world.attempt().saturating_sub(1);
                    world.apply(PayoutCommand::RecordUnknown { attempt, detail: "stale".into() });
                }
                Step::Expire { minutes } => {
                    world.now += Duration::minutes(minutes);
                    world.apply(PayoutCommand::ExpireLease);
                }
            }
            prop_assert!(world.payments <= 1, "paid twice: {:?}", world.events);
            let payout = world.state.payout.as_ref().unwrap();
            prop_assert!(payout.attempts <= PAYOUT_ATTEMPTS_MAX);
            if world.status() == PayoutStatus::Succeeded {
                prop_assert_eq!(world.payments, 1);
            }
        }
        // Whatever happened, a truthful reconciliation settles it: a paid
        // payout ends succeeded, an unpaid one can be attempted again.
        if world.status() == PayoutStatus::InFlight {
            world.now += Duration::hours(1);
            let expired = world.apply(PayoutCommand::ExpireLease);
            prop_assert!(expired);
        }
        if world.status() == PayoutStatus::Unknown {
            world.now += Duration::hours(1);
            let finding = world.truth();
            let reconciled = world.apply(PayoutCommand::Reconcile { finding });
            prop_assert!(reconciled);
        }
        match world.status() {
            PayoutStatus::Succeeded => prop_assert_eq!(world.payments, 1),
            PayoutStatus::Scheduled | PayoutStatus::Failed => prop_assert_eq!(world.payments, 0),
            other => prop_assert!(false, "unsettled after reconciliation: {:?}", other),
        }
        // Attempt numbers are contiguous and all use the same key.
        let mut expected = 1;
        for event in &world.events {
            if let PayoutEvent::PayoutAttempted { attempt, idempotency_key, .. } = event {
                prop_assert_eq!(*attempt, expected);
                let key = Uuid::from_u128(1).to_string();
                prop_assert_eq!(idempotency_key, &key);
                expected += 1;
            }
        }
    }

    #[test]
    fn interest_rounds_down_and_keeps_the_remainder(
        principal in 0i64..1_000_000_000_000,
        bps in 0u32..100_000,
        days in 1u32..3_660,
    ) {
        let (paid, remainder) = interest_for(Amount::new(principal).unwrap(), bps, days);
        let exact = principal as u128 * u128::from(bps) * u128::from(days);
        prop_assert!(remainder < INTEREST_DENOMINATOR);
        prop_assert_eq!(paid.minor() as u128 * INTEREST_DENOMINATOR + remainder, exact);
    }
}

#[test]
fn an_ambiguous_outcome_must_be_reconciled_before_another_attempt() {
    let mut world = scheduled_world();
    let lease_until = world.now + Duration::seconds(30);
    assert!(world.apply(PayoutCommand::Attempt { lease_until }));
    assert!(world.apply(PayoutCommand::RecordUnknown {
        attempt: 1,
        detail: "timeout".into()
    }));
    assert!(
        !world.apply(PayoutCommand::Attempt { lease_until }),
        "no blind retry"
    );
    assert!(
        !world.apply(PayoutCommand::Reconcile {
            finding: ProviderFinding::NotFound
        }),
        "a payment may still be landing until the claim's lease ends"
    );
    world.now += Duration::seconds(31);
    assert!(world.apply(PayoutCommand::Reconcile {
        finding: ProviderFinding::NotFound
    }));
    let lease_until = world.now + Duration::seconds(30);
    assert!(
        world.apply(PayoutCommand::Attempt { lease_until }),
        "retry after a lookup"
    );
    assert_eq!(world.state.payout.unwrap().attempts, 2);
}
