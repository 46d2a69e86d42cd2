//! The decider shape shared by every aggregate.

use chrono::{DateTime, Utc};

/// An aggregate as a pure state machine: `decide` holds every rule and
/// `evolve` only applies facts. The shell passes the time in.
pub trait Decider {
    /// The state folded from the aggregate's events.
    type State: Default + Clone + PartialEq + std::fmt::Debug;
    /// What a caller asks for.
    type Command;
    /// What happened.
    type Event: Clone + std::fmt::Debug;
    /// Why a command was refused.
    type Rejection: std::error::Error;

    /// Decides what a command means given the state and the current time.
    /// An empty list means the command was already satisfied (idempotent).
    fn decide(
        state: &Self::State,
        command: &Self::Command,
        now: DateTime<Utc>,
    ) -> Result<Vec<Self::Event>, Self::Rejection>;

    /// Applies one event. Never fails; a history that breaks an invariant is a
    /// bug and panics.
    fn evolve(state: Self::State, event: &Self::Event) -> Self::State;

    /// Folds a whole history from the initial state.
    fn replay<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self::State
    where
        Self::Event: 'a,
    {
        events
            .into_iter()
            .fold(Self::State::default(), |state, event| {
                Self::evolve(state, event)
            })
    }
}

/// Stable naming of stored events: a type name that never changes once
/// released, and the schema version of the shape this code writes.
pub trait EventType {
    /// The stored type name, e.g. `quota_reserved`.
    fn event_type(&self) -> &'static str;
    /// The schema version of this event's current shape.
    fn schema_version(&self) -> u16 {
        1
    }
}
