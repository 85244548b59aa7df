//! NAT rules between the API and the running engine.
//!
//! - [`to_engine`] is the one conversion of an API rule ([`NatRule`]) to the NAT
//!   engine's rule; the configuration file's SNAT and DNAT rules are built with it too.
//! - [`NatRules`] is the store of the rules installed in the engine: every rule has a
//!   unique name and the engine id the store gave it; rules the API can express carry
//!   their API form (what `ListNatRules` shows), the others (masquerade, full NAT, VIP
//!   and rules with matches the API lacks, from the configuration file) only a name.
//!   Pools of API rules of one kind do not overlap and the number of rules is bounded.
//!
//! A rule is installed in the engine ([`NatRuleSet`]) in the same step as it is
//! recorded, and removed from it in the same step as it is forgotten: the store and
//! the engine never disagree. Removing a rule keeps Linux's behaviour: connections it
//! translated keep their binding until they end; only new connections no longer match.

use std::net::IpAddr;

use ctoffload_fallback_sw::nat::rules::{
    AddrRange as EngineAddrRange, NatAction, NatFlags, NatRule as EngineRule, NatRuleSet,
    PortRange, RuleError, RuleId, RuleMatch,
};
use ctoffload_fallback_sw::table::{Conn, Status};
use ctoffload_fallback_sw::tuple::Addr;

use super::error::ApiError;
use super::model::{AddrRange, NatKind, NatRule, PortPool, ip_num};

/// The engine's form of an address.
#[must_use]
pub fn engine_addr(ip: IpAddr) -> Addr {
    Addr::from_ip(ip).0
}

/// The engine's form of an address range.
#[must_use]
pub fn engine_range(r: AddrRange) -> EngineAddrRange {
    EngineAddrRange {
        family: r.family(),
        min: engine_addr(r.first),
        max: engine_addr(r.last),
    }
}

/// The engine's rule for an API rule, with engine id `id`. Errors name the API
/// field the engine cannot serve (a DNAT rule translates to one address and at most
/// one port); what the engine checks itself ([`NatRuleSet::add`]: IPv4 only, port
/// translation needs a port protocol) is reported when the rule is installed.
pub fn to_engine(rule: &NatRule, id: RuleId) -> Result<EngineRule, ApiError> {
    let action = match rule.kind {
        NatKind::Snat => NatAction::Snat {
            addrs: engine_range(rule.to_addrs),
            ports: rule.to_ports.map(|(min, max)| PortRange::new(min, max)),
            flags: NatFlags::default(),
        },
        NatKind::Dnat => {
            if rule.to_addrs.first != rule.to_addrs.last {
                return Err(ApiError::invalid(
                    "to_addresses",
                    "a DNAT rule translates to one address",
                ));
            }
            let to_port = match rule.to_ports {
                None => None,
                Some((a, b)) if a == b => Some(a),
                Some(_) => {
                    return Err(ApiError::invalid(
                        "to_ports",
                        "a DNAT rule translates to one port",
                    ));
                }
            };
            NatAction::Dnat {
                to_addr: engine_addr(rule.to_addrs.first),
                to_port,
            }
        }
    };
    Ok(EngineRule {
        id,
        r#match: RuleMatch {
            src: rule.src,
            dst: rule.dst,
            proto: rule.protocol,
            zone: rule.zone,
            ..RuleMatch::default()
        },
        action,
    })
}

/// One installed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRule {
    /// Unique name.
    pub name: String,
    /// The id the engine knows it by (never reused).
    pub id: RuleId,
    /// The API's view, when the API can express the rule.
    pub api: Option<NatRule>,
}

/// The installed rules in insertion (and match) order.
#[derive(Debug, Clone, Default)]
pub struct NatRules {
    rules: Vec<StoredRule>,
    /// The last engine id handed out.
    last_id: RuleId,
}

fn ranges_meet(a: (u128, u128), b: (u128, u128)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

impl NatRules {
    /// The rules the API can express, in order.
    pub fn api_rules(&self) -> impl Iterator<Item = &NatRule> {
        self.rules.iter().filter_map(|r| r.api.as_ref())
    }

    /// Every installed rule, in order.
    #[must_use]
    pub fn stored(&self) -> &[StoredRule] {
        &self.rules
    }

    /// Number of rules (all of them count against `limits.max_nat_rules`).
    #[must_use]
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there is no rule.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Check `name` and the API form (overlap with the pools of the other API rules)
    /// against the store and the limit. Errors name fields relative to the rule.
    pub fn check(&self, name: &str, api: Option<&NatRule>, max_rules: u64) -> Result<(), ApiError> {
        if let Some(other) = self.rules.iter().find(|r| r.name == name) {
            return Err(ApiError::AlreadyExists {
                field: "name".into(),
                reason: format!("a NAT rule named {:?} exists", other.name),
            });
        }
        if let Some(rule) = api {
            for other in self.api_rules() {
                check_overlap(rule, other)?;
            }
        }
        if self.rules.len() as u64 >= max_rules {
            return Err(ApiError::ResourceExhausted {
                resource: "limits.max_nat_rules".into(),
                limit: max_rules,
            });
        }
        Ok(())
    }

    /// Check a rule ([`NatRules::check`]), install `engine` in `set` under a new id and
    /// record it. Returns the id. On error neither the store nor `set` changed.
    pub fn install(
        &mut self,
        name: String,
        api: Option<NatRule>,
        mut engine: EngineRule,
        max_rules: u64,
        set: &mut NatRuleSet,
    ) -> Result<RuleId, ApiError> {
        self.check(&name, api.as_ref(), max_rules)?;
        let id = self
            .last_id
            .checked_add(1)
            .ok_or(ApiError::ResourceExhausted {
                resource: "NAT rule ids".into(),
                limit: u64::from(RuleId::MAX),
            })?;
        engine.id = id;
        set.add(engine).map_err(|e| self.engine_error(&e))?;
        self.last_id = id;
        self.rules.push(StoredRule { name, id, api });
        Ok(id)
    }

    /// Remove a rule by name from the store and from `set`. Connections it translated
    /// keep their binding (Linux).
    pub fn uninstall(&mut self, name: &str, set: &mut NatRuleSet) -> Result<StoredRule, ApiError> {
        let idx = self
            .rules
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| ApiError::NotFound {
                what: format!("NAT rule {name:?}"),
            })?;
        let rule = self.rules.remove(idx);
        set.remove(rule.id);
        Ok(rule)
    }

    /// An engine refusal as an API error on the rule's fields.
    fn engine_error(&self, e: &RuleError) -> ApiError {
        let field = match e {
            RuleError::ReversedRange { field, .. }
            | RuleError::EmptyRange { field, .. }
            | RuleError::FamilyMismatch { field, .. }
            | RuleError::Ipv6Unsupported { field, .. }
            | RuleError::PortsNeedProtocol { field, .. } => match *field {
                "match.src" => "src_prefix",
                "match.dst" => "dst_prefix",
                "action.ports" | "action.snat_ports" | "action.to_port" => "to_ports",
                _ => "to_addresses",
            },
            RuleError::OverlappingPool { other, .. } => {
                let name = self
                    .rules
                    .iter()
                    .find(|r| r.id == *other)
                    .map_or("?", |r| r.name.as_str());
                return ApiError::invalid(
                    "to_addresses",
                    format!("source pool overlaps the pool of NAT rule {name:?}"),
                );
            }
            RuleError::OutPortOnDstRule { .. }
            | RuleError::NoBackends { .. }
            | RuleError::ZeroWeight { .. }
            | RuleError::DuplicateBackend { .. }
            | RuleError::DuplicateId { .. }
            | RuleError::NoSuchRule { .. }
            | RuleError::NotVip { .. } => "",
        };
        let reason = e.to_string();
        let reason = reason.split_once(": ").map_or(reason.as_str(), |(_, r)| r);
        ApiError::invalid(field, reason.to_owned())
    }

    /// Pool usage of every API rule: the connections of `conns` whose translated
    /// tuple lies in the rule's pool (translated source for SNAT, destination for
    /// DNAT), counted in one pass.
    pub fn pools<P>(&self, conns: impl Iterator<Item = Conn<P>>) -> Vec<PortPool> {
        let rules: Vec<&NatRule> = self.api_rules().collect();
        let mut used = vec![0u64; rules.len()];
        for c in conns {
            for (kind, bit) in [
                (NatKind::Snat, Status::SRC_NAT),
                (NatKind::Dnat, Status::DST_NAT),
            ] {
                if !c.status.contains(bit) {
                    continue;
                }
                let reply = &c.tuples[1];
                // The reply's destination is the translated source; its source the
                // translated destination.
                let (addr, port) = match kind {
                    NatKind::Snat => (reply.dst, reply.dst_l4),
                    NatKind::Dnat => (reply.src, reply.src_l4),
                };
                let ip = ip_num(addr.to_ip(reply.family));
                if let Some(i) = rules.iter().position(|r| {
                    r.kind == kind
                        && r.to_addrs.family() == reply.family
                        && ranges_meet(r.to_addrs.bounds(), (ip, ip))
                        && r.to_ports.is_none_or(|(a, b)| (a..=b).contains(&port))
                }) {
                    used[i] += 1;
                }
            }
        }
        rules
            .iter()
            .zip(used)
            .map(|(r, used)| PortPool {
                rule: r.name.clone(),
                total: r.pool_size(),
                used,
            })
            .collect()
    }
}

/// Whether two API rules of one kind would hand out the same address and port.
fn check_overlap(rule: &NatRule, other: &NatRule) -> Result<(), ApiError> {
    let same_proto = match (rule.protocol, other.protocol) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    if other.kind != rule.kind
        || other.to_addrs.family() != rule.to_addrs.family()
        || !same_proto
        || !ranges_meet(rule.to_addrs.bounds(), other.to_addrs.bounds())
    {
        return Ok(());
    }
    let ports = |p: Option<(u16, u16)>| {
        let (a, b) = p.unwrap_or((1, u16::MAX));
        (u128::from(a), u128::from(b))
    };
    if !ranges_meet(ports(rule.to_ports), ports(other.to_ports)) {
        return Ok(());
    }
    let field = if rule.to_ports.is_some() && other.to_ports.is_some() {
        "to_ports"
    } else {
        "to_addresses"
    };
    Err(ApiError::invalid(
        field,
        format!(
            "pool {}-{} overlaps the pool of rule {:?} ({}-{})",
            rule.to_addrs.first,
            rule.to_addrs.last,
            other.name,
            other.to_addrs.first,
            other.to_addrs.last
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctoffload_fallback_sw::conntrack::Prefix;
    use ctoffload_fallback_sw::tuple::proto as ipproto;

    fn rule(name: &str, kind: NatKind, first: &str, last: &str) -> NatRule {
        NatRule {
            name: name.into(),
            kind,
            protocol: Some(ipproto::UDP),
            src: None,
            dst: None,
            zone: None,
            to_addrs: AddrRange {
                first: first.parse().unwrap_or_else(|e| panic!("{e}")),
                last: last.parse().unwrap_or_else(|e| panic!("{e}")),
            },
            to_ports: None,
        }
    }

    #[test]
    fn api_rules_convert_to_the_engines_actions() {
        let mut snat = rule("s", NatKind::Snat, "192.0.2.1", "192.0.2.4");
        snat.to_ports = Some((1024, 2047));
        snat.src = Some(Prefix {
            family: ctoffload_fallback_sw::tuple::Family::V4,
            addr: Addr::v4([10, 0, 0, 0]),
            len: 8,
        });
        let e = to_engine(&snat, 7).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.id, 7);
        assert_eq!(e.r#match.src, snat.src);
        assert_eq!(e.r#match.proto, Some(ipproto::UDP));
        assert_eq!(
            e.action,
            NatAction::Snat {
                addrs: EngineAddrRange::v4([192, 0, 2, 1], [192, 0, 2, 4]),
                ports: Some(PortRange::new(1024, 2047)),
                flags: NatFlags::default(),
            }
        );
        let mut dnat = rule("d", NatKind::Dnat, "10.0.0.80", "10.0.0.80");
        dnat.to_ports = Some((80, 80));
        let e = to_engine(&dnat, 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            e.action,
            NatAction::Dnat {
                to_addr: Addr::v4([10, 0, 0, 80]),
                to_port: Some(80),
            }
        );
        dnat.to_ports = Some((80, 81));
        let err = to_engine(&dnat, 1).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("to_ports: a DNAT rule translates to one port")
        );
    }

    #[test]
    fn store_and_engine_change_together() {
        let (mut store, mut set) = (NatRules::default(), NatRuleSet::default());
        let a = rule("a", NatKind::Snat, "192.0.2.1", "192.0.2.1");
        let engine = to_engine(&a, 0).unwrap_or_else(|e| panic!("{e}"));
        let id = store
            .install("a".into(), Some(a.clone()), engine.clone(), 8, &mut set)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);
        // The engine refuses an IPv6 pool: neither side changes.
        let v6 = rule("v6", NatKind::Snat, "2001:db8::1", "2001:db8::1");
        let engine6 = to_engine(&v6, 0).unwrap_or_else(|e| panic!("{e}"));
        let err = store
            .install("v6".into(), Some(v6), engine6, 8, &mut set)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("to_addresses: "), "{err}");
        assert_eq!((store.len(), set.len()), (1, 1));
        // Removed from both; a new rule gets a new id.
        store
            .uninstall("a", &mut set)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((store.len(), set.len()), (0, 0));
        let again = store
            .install("a".into(), Some(a), engine, 8, &mut set)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(again > id, "ids are not reused");
        assert!(matches!(
            store.uninstall("nope", &mut set),
            Err(ApiError::NotFound { .. })
        ));
    }
}
