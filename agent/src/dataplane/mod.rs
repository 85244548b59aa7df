//! The data plane: the software conntrack joined to the hardware flow table.
//!
//! - [`hw_rule`]: the pure function from a connection to its two device flow entries.
//! - [`policy`]: which connections go to hardware and when; why one is not there.
//! - [`state`]: the per-connection hardware state (`None`, `Pending`, `Offloaded`,
//!   `Dying`, `Dead`) in an agent-side table keyed by connection.
//! - [`worker`]: the run-to-completion worker (exception RX → conntrack/NAT → TX,
//!   batched flow commands); `offload` applies command completions.
//! - [`reconciler`]: incremental bulk counter pull, idle expiry, teardown.
//! - [`control`]: what the control plane asks of a worker (observed events, policy,
//!   drain), serviced between polls.
//! - `faults`: device faults and recovery.
//! - [`slots`]: per device slot owner and counter baseline (wrap-safe deltas).
//! - [`router`]: the worker as a gateway between real hosts (ARP, routes, TTL, next-hop
//!   MACs in the hardware rules), reusing `crate::gateway`.
//! - [`restore`]: rebuilding connections from the device table after a restart.
//!
//! `docs/agent.md` describes how each invariant of the design is kept.

pub mod control;
mod faults;
pub mod hw_rule;
mod offload;
pub mod policy;
pub mod reconciler;
pub mod restore;
pub mod router;
pub mod slots;
pub mod state;
pub mod worker;

pub use control::{Observed, Observer};
pub use hw_rule::{HwRule, PortL2, Routing, RuleError, build_rules};
pub use policy::{NotOffloaded, OffloadPolicy, Wait};
pub use restore::RestoreReport;
pub use state::{AfterDelete, ConnHandle, Entry, HwConn, HwState};
pub use worker::{Worker, WorkerConfig, WorkerStats};
