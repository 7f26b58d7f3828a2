//! Offline evaluations, run by `retargetiq evaluate` and `retargetiq evaluate-offers` (the CLI
//! only wires the commands):
//!
//! - [`history`]: recommendation quality on a real shopping history (REES46, Taobao, or the
//!   platform's own event format): the history before a held-out period is replayed through
//!   the services' own code, and each returning user's list is scored against what they went
//!   on to do, next to baselines computed in the same run.
//! - [`live`]: the same scoring against a running stack: the history before the held-out
//!   period is sent through the ingestion APIs ([`import`]), and each returning user's list
//!   is asked of `GET /recommend/{userId}`.
//! - [`simulated`]: the same on simulated shoppers whose preferences are known.
//! - [`offers`]: the offer bandit against the original rule engine.
//! - [`replay`]: the services' logic wired together in memory, which both recommendation
//!   evaluations replay through.
//! - [`progress`]: the progress lines of long passes (reading a history, replaying, sending,
//!   importing a catalog).

pub mod history;
pub mod import;
pub mod live;
pub mod offers;
pub mod progress;
pub mod replay;
pub mod simulated;
