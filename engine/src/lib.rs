//! The command side of the ledger: one single-writer task per active product
//! deciding purchases in batches (reserve, debit, confirm or release), an
//! account book deciding account commands in batched multi-stream appends,
//! and the recovery of anything a crash left pending.

pub mod accounts;
pub mod aggregate;
pub mod audit;
pub mod clock;
pub mod context;
pub mod engine;
pub mod error;
pub mod oracle;
pub mod ownership;
pub mod payouts;
pub mod recovery;
pub mod stats;
pub mod writer;

pub use clock::{Clock, ManualClock, SystemClock};
pub use context::RequestContext;
pub use engine::{Engine, EngineSettings, PurchaseRequest, order_id_for};
pub use error::{CommandError, PurchaseError};
pub use ownership::ClusterSettings;
pub use stats::{EngineStats, StatsSnapshot};
pub use writer::{Placed, PurchaseReceipt, SaleSnapshot};
