//! The settings the API changes at run time (NAT rules, timeouts, limits), shared by
//! both control planes, and how each reaches the running engine.
//!
//! [`Settings`] is owned next to the engine it drives: under the software table's lock
//! in [`SoftwareControl`](super::SoftwareControl), on the worker thread in
//! [`DataplaneControl`](super::DataplaneControl). Every change is applied to the
//! engine in the same step as it is recorded, so what the API shows is what runs:
//!
//! - NAT rules are installed in (and removed from) the engine's rule set at once; new
//!   connections see them at their first packet. Removing a rule keeps Linux's
//!   behaviour: connections it translated keep their binding until they end.
//! - Timeouts apply like Linux's `nf_conntrack_*_timeout*` sysctls: new connections
//!   start with the new values, existing ones take them at their next packet.
//! - `max_connections` applies like `nf_conntrack_max`: a limit on the count, separate
//!   from the table's allocation. Lowering it evicts nothing; new connections then
//!   early-drop an unassured entry or are refused until the count is under the limit.
//!   The table is allocated once (no allocation on the packet path), so a limit above
//!   its allocated size admits only that many and reports `restart_required` until a
//!   restart allocates the larger table.

use ctoffload_fallback_sw::conntrack::Conntrack;
use ctoffload_fallback_sw::nat::rules::{NatRule as EngineRule, NatRuleSet};

use super::error::ApiError;
use super::model::{Configured, Limits, LimitsUpdate, NatRule, PortPool, Timeouts, TimeoutsUpdate};
use super::nat::{NatRules, to_engine};

/// NAT rules the API accepts at most unless configured otherwise.
pub const DEFAULT_MAX_NAT_RULES: u64 = 1024;

/// What the settings need of a running engine.
pub trait Engine {
    /// The conntrack instance (configuration, table, NAT engine).
    fn conntrack(&self) -> &Conntrack;
    /// The NAT engine's rules.
    fn nat_rules_mut(&mut self) -> &mut NatRuleSet;
    /// Apply timeouts (existing connections at their next packet).
    fn set_timeouts(&mut self, t: &Timeouts);
    /// Apply the connection limit; returns the limit now in force.
    fn set_max_connections(&mut self, max: usize) -> usize;
}

impl Engine for Conntrack {
    fn conntrack(&self) -> &Conntrack {
        self
    }
    fn nat_rules_mut(&mut self) -> &mut NatRuleSet {
        self.nat_mut().rules_mut()
    }
    fn set_timeouts(&mut self, t: &Timeouts) {
        Conntrack::set_timeouts(self, t.tcp, t.other);
    }
    fn set_max_connections(&mut self, max: usize) -> usize {
        Conntrack::set_max_connections(self, max)
    }
}

/// The run-time settings. See the module documentation.
#[derive(Debug, Clone)]
pub struct Settings {
    nat: NatRules,
    timeouts: Timeouts,
    limits: Limits,
}

fn as_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl Settings {
    /// The settings an engine runs with now (no NAT rule recorded yet).
    #[must_use]
    pub fn of(ct: &Conntrack, journal_capacity: usize) -> Self {
        let cfg = ct.config();
        let cap = ct.table().capacity() as u64;
        Self {
            nat: NatRules::default(),
            timeouts: Timeouts {
                tcp: cfg.tcp.timeouts,
                other: cfg.timeouts,
            },
            limits: Limits {
                max_connections: ct.table().limit() as u64,
                max_offloaded: cap,
                max_nat_rules: DEFAULT_MAX_NAT_RULES,
                event_journal_capacity: journal_capacity as u64,
            },
        }
    }

    /// The limits as configured.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The NAT rules the API shows, in match order.
    #[must_use]
    pub fn nat_rules(&self) -> Vec<NatRule> {
        self.nat.api_rules().cloned().collect()
    }

    /// Add an API rule to the store and the engine.
    pub fn add_nat_rule(
        &mut self,
        engine: &mut impl Engine,
        rule: NatRule,
    ) -> Result<NatRule, ApiError> {
        // The id is the store's to choose; `install` sets it.
        let converted = to_engine(&rule, 0)?;
        self.nat.install(
            rule.name.clone(),
            Some(rule.clone()),
            converted,
            self.limits.max_nat_rules,
            engine.nat_rules_mut(),
        )?;
        Ok(rule)
    }

    /// Add a rule given in the engine's form (the configuration file's), shown by the
    /// API as `api` when it can express it.
    pub fn add_engine_rule(
        &mut self,
        engine: &mut impl Engine,
        name: String,
        rule: EngineRule,
        api: Option<NatRule>,
    ) -> Result<(), ApiError> {
        self.nat
            .install(
                name,
                api,
                rule,
                self.limits.max_nat_rules,
                engine.nat_rules_mut(),
            )
            .map(drop)
    }

    /// Remove a rule by name from the store and the engine; connections it translated
    /// keep their binding.
    pub fn remove_nat_rule(
        &mut self,
        engine: &mut impl Engine,
        name: &str,
    ) -> Result<(), ApiError> {
        self.nat.uninstall(name, engine.nat_rules_mut()).map(drop)
    }

    /// Port-pool usage per API rule, from the engine's connections.
    #[must_use]
    pub fn port_pools(&self, ct: &Conntrack, now: u64) -> Vec<PortPool> {
        self.nat.pools(ct.table().iter(now).map(|(_, c)| c))
    }

    /// The timeouts, and whether the engine runs with other values (it does not once
    /// they have been applied).
    #[must_use]
    pub fn timeouts(&self, ct: &Conntrack) -> Configured<Timeouts> {
        let running = ct.config();
        Configured {
            value: self.timeouts,
            restart_required: running.tcp.timeouts != self.timeouts.tcp
                || running.timeouts != self.timeouts.other,
        }
    }

    /// Apply a timeouts update to the engine and record it.
    pub fn set_timeouts(
        &mut self,
        engine: &mut impl Engine,
        update: TimeoutsUpdate,
    ) -> Configured<Timeouts> {
        self.timeouts = update.apply(&self.timeouts);
        engine.set_timeouts(&self.timeouts);
        self.timeouts(engine.conntrack())
    }

    /// The limits, and whether `max_connections` waits for a restart (it is above the
    /// table's allocated size).
    #[must_use]
    pub fn configured_limits(&self, ct: &Conntrack) -> Configured<Limits> {
        Configured {
            value: self.limits,
            restart_required: self.limits.max_connections > ct.table().capacity() as u64,
        }
    }

    /// The limits after `update`, refused when they are below what exists now:
    /// `offloaded` flows on the fast path (when the backend enforces the limit) or the
    /// NAT rules installed.
    pub fn check_limits(
        &self,
        update: LimitsUpdate,
        offloaded: Option<u64>,
    ) -> Result<Limits, ApiError> {
        let new = update.apply(&self.limits);
        if let Some(n) = offloaded
            && new.max_offloaded < n
        {
            return Err(ApiError::FailedPrecondition {
                reason: format!(
                    "limits.max_offloaded: {n} flows are offloaded now, more than {}; drain first",
                    new.max_offloaded
                ),
            });
        }
        let rules = self.nat.len() as u64;
        if new.max_nat_rules < rules {
            return Err(ApiError::FailedPrecondition {
                reason: format!(
                    "limits.max_nat_rules: {rules} rules exist, more than {}; remove some first",
                    new.max_nat_rules
                ),
            });
        }
        Ok(new)
    }

    /// Record limits checked by [`Settings::check_limits`] and apply `max_connections`
    /// to the engine (within the table's allocation; see the module documentation).
    pub fn set_limits(&mut self, engine: &mut impl Engine, new: Limits) -> Configured<Limits> {
        self.limits = new;
        let applied = engine.set_max_connections(as_usize(new.max_connections));
        if (applied as u64) < new.max_connections {
            tracing::warn!(
                configured = new.max_connections,
                allocated = applied,
                "limits.max_connections is above the table's allocated size: \
                 admitting {applied} until a restart allocates the larger table"
            );
        }
        self.configured_limits(engine.conntrack())
    }
}
