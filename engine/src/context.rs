//! Who asked for a command and within which request: stamped on every event.

use store::Metadata;
use uuid::Uuid;

/// The caller of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// The user, if a user asked.
    pub actor_id: Option<String>,
    /// The role they acted in (`system` for the engine's own work).
    pub actor_role: String,
    /// The request (HTTP request id, or a CLI run id).
    pub request_id: Option<String>,
    /// The command this context carries: the causation id of the events it
    /// causes when no earlier event caused them.
    pub command_id: Uuid,
}

impl RequestContext {
    /// The engine acting on its own (expiry, recovery).
    pub fn system() -> RequestContext {
        RequestContext {
            actor_id: None,
            actor_role: "system".to_owned(),
            request_id: None,
            command_id: Uuid::now_v7(),
        }
    }

    /// A user acting in a role.
    pub fn user(
        actor_id: impl Into<String>,
        role: impl Into<String>,
        request_id: Option<String>,
    ) -> RequestContext {
        RequestContext {
            actor_id: Some(actor_id.into()),
            actor_role: role.into(),
            request_id,
            command_id: Uuid::now_v7(),
        }
    }

    /// The metadata of an event this request causes within a business process.
    pub fn metadata(&self, correlation_id: Option<Uuid>, causation_id: Option<Uuid>) -> Metadata {
        Metadata {
            correlation_id,
            causation_id: causation_id.or(Some(self.command_id)),
            actor_id: self.actor_id.clone(),
            actor_role: Some(self.actor_role.clone()),
            request_id: self.request_id.clone(),
        }
    }
}
