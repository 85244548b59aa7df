//! The NAT rule store: names are unique, pools of rules of one kind do not overlap,
//! and the number of rules is bounded.

use super::error::ApiError;
use super::model::{NatRule, PortPool};

/// Rules in insertion order.
#[derive(Debug, Clone, Default)]
pub struct NatRules {
    rules: Vec<NatRule>,
}

fn ranges_meet(a: (u128, u128), b: (u128, u128)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

impl NatRules {
    /// The rules.
    #[must_use]
    pub fn rules(&self) -> &[NatRule] {
        &self.rules
    }

    /// Number of rules.
    #[must_use]
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there is no rule.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Add a validated rule. Errors name fields relative to the rule.
    pub fn add(&mut self, rule: NatRule, max_rules: u64) -> Result<(), ApiError> {
        if let Some(other) = self.rules.iter().find(|r| r.name == rule.name) {
            return Err(ApiError::AlreadyExists {
                field: "name".into(),
                reason: format!("a NAT rule named {:?} exists", other.name),
            });
        }
        for other in &self.rules {
            let same_proto = match (rule.protocol, other.protocol) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            if other.kind != rule.kind
                || other.to_addrs.family() != rule.to_addrs.family()
                || !same_proto
                || !ranges_meet(rule.to_addrs.bounds(), other.to_addrs.bounds())
            {
                continue;
            }
            let ports = |p: Option<(u16, u16)>| {
                let (a, b) = p.unwrap_or((1, u16::MAX));
                (u128::from(a), u128::from(b))
            };
            if ranges_meet(ports(rule.to_ports), ports(other.to_ports)) {
                let field = if rule.to_ports.is_some() && other.to_ports.is_some() {
                    "to_ports"
                } else {
                    "to_addresses"
                };
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "pool {}-{} overlaps the pool of rule {:?} ({}-{})",
                        rule.to_addrs.first,
                        rule.to_addrs.last,
                        other.name,
                        other.to_addrs.first,
                        other.to_addrs.last
                    ),
                ));
            }
        }
        if self.rules.len() as u64 >= max_rules {
            return Err(ApiError::ResourceExhausted {
                resource: "limits.max_nat_rules".into(),
                limit: max_rules,
            });
        }
        self.rules.push(rule);
        Ok(())
    }

    /// Remove a rule; `in_use` says how many bindings it has now.
    pub fn remove(&mut self, name: &str, in_use: u64) -> Result<NatRule, ApiError> {
        let idx = self
            .rules
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| ApiError::NotFound {
                what: format!("NAT rule {name:?}"),
            })?;
        if in_use > 0 {
            return Err(ApiError::FailedPrecondition {
                reason: format!("NAT rule {name:?} has {in_use} bindings; delete them first"),
            });
        }
        Ok(self.rules.remove(idx))
    }

    /// Pool usage of every rule, given the bindings of each.
    #[must_use]
    pub fn pools(&self, used: impl Fn(&NatRule) -> u64) -> Vec<PortPool> {
        self.rules
            .iter()
            .map(|r| PortPool {
                rule: r.name.clone(),
                total: r.pool_size(),
                used: used(r),
            })
            .collect()
    }
}
