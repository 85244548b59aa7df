//! The boundary between the API server and the agent's core.

use ctoffload_fallback_sw::nat::rules::NatRule as EngineRule;

use super::error::ApiError;
use super::journal::EventJournal;
use super::model::{
    Configured, ConnFilter, ConnInfo, ConnKey, DeviceStatus, Limits, LimitsUpdate, ListCursor,
    ListPage, NatRule, OffloadPolicy, StatsSnapshot, Timeouts, TimeoutsUpdate,
};

/// What the gRPC server asks of the agent's core. The dataplane (workers owning
/// per-worker conntrack tables, the offload policy, the driver) implements it;
/// [`SoftwareControl`](super::SoftwareControl) implements it over one software table.
///
/// Methods are synchronous and must do bounded work: they are called from the
/// server's async tasks. Listing is paged for that reason. Every error is an
/// [`ApiError`], whose field paths are relative to the request.
pub trait ControlPlane: Send + Sync + 'static {
    /// Up to `max` connections selected by `filter`, starting at `cursor`.
    fn list(
        &self,
        filter: &ConnFilter,
        cursor: ListCursor,
        max: usize,
    ) -> Result<ListPage, ApiError>;
    /// One connection.
    fn get(&self, key: &ConnKey) -> Result<ConnInfo, ApiError>;
    /// Delete one connection, taking it off the fast path first; returns it as it was.
    fn delete(&self, key: &ConnKey) -> Result<ConnInfo, ApiError>;
    /// Delete the selected connections; returns how many.
    fn delete_matching(&self, filter: &ConnFilter) -> Result<u64, ApiError>;
    /// Delete every connection; returns how many.
    fn flush(&self) -> Result<u64, ApiError>;
    /// The event journal.
    fn journal(&self) -> &EventJournal;
    /// Statistics.
    fn stats(&self) -> Result<StatsSnapshot, ApiError>;
    /// NAT rules in insertion order.
    fn nat_rules(&self) -> Result<Vec<NatRule>, ApiError>;
    /// Add a rule (checked against the others and the limits) and install it in the
    /// running engine: new connections see it.
    fn add_nat_rule(&self, rule: NatRule) -> Result<NatRule, ApiError>;
    /// Add a rule given in the engine's form (the configuration file's, which may use
    /// actions and matches the API lacks), shown by `nat_rules` as `api` when the API
    /// can express it. Its id is the control plane's to choose.
    fn add_engine_nat_rule(
        &self,
        name: String,
        rule: EngineRule,
        api: Option<NatRule>,
    ) -> Result<(), ApiError>;
    /// Remove a rule by name, from the running engine too. Connections it translated
    /// keep their binding until they end (Linux).
    fn remove_nat_rule(&self, name: &str) -> Result<(), ApiError>;
    /// The offload policy.
    fn offload_policy(&self) -> Result<OffloadPolicy, ApiError>;
    /// Replace the offload policy.
    fn set_offload_policy(&self, policy: OffloadPolicy) -> Result<OffloadPolicy, ApiError>;
    /// Take every flow off the fast path; returns how many.
    fn drain_offload(&self, disable: bool) -> Result<u64, ApiError>;
    /// Device status.
    fn device_status(&self) -> Result<DeviceStatus, ApiError>;
    /// Timeouts.
    fn timeouts(&self) -> Result<Configured<Timeouts>, ApiError>;
    /// Change timeouts: applied to the running engine, existing connections take them
    /// at their next packet.
    fn set_timeouts(&self, update: TimeoutsUpdate) -> Result<Configured<Timeouts>, ApiError>;
    /// Limits.
    fn limits(&self) -> Result<Configured<Limits>, ApiError>;
    /// Change limits: `max_connections` applies to the running table (see
    /// [`settings`](super::settings)).
    fn set_limits(&self, update: LimitsUpdate) -> Result<Configured<Limits>, ApiError>;
}
