//! The gateway of an agent configuration: `[[ports]]` (MAC, IPv4 addresses) and
//! `[[routes]]` (IPv4 only: IPv6 is not routed, see the module docs of [`super`]).
//! Errors name the configuration key at fault.

use std::net::IpAddr;

use ctoffload_fallback_sw::tuple::Family;

use super::{ConfigError, Gateway, GatewayConfig, PortConfig, Prefix, StaticRoute};
use crate::config::AgentConfig;

/// A gateway configuration the agent's configuration cannot give.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {source}")]
pub struct GatewayConfigError {
    /// The configuration key (`routes[2].via`, `ports`).
    pub key: String,
    /// What the gateway refused.
    #[source]
    pub source: ConfigError,
}

/// The gateway's view of `cfg`'s ports and routes (IPv6 addresses and routes left out).
#[must_use]
pub fn gateway_config(cfg: &AgentConfig) -> GatewayConfig {
    GatewayConfig {
        ports: cfg
            .ports
            .iter()
            .map(|p| PortConfig {
                name: p.name.clone(),
                mac: p.mac,
                addrs: p
                    .addresses
                    .iter()
                    .filter_map(|&(a, len)| match a {
                        IpAddr::V4(v4) => Some((v4.octets(), len)),
                        IpAddr::V6(_) => None,
                    })
                    .collect(),
            })
            .collect(),
        routes: cfg
            .routes
            .iter()
            .filter(|r| r.prefix.family == Family::V4)
            .map(|r| StaticRoute {
                prefix: Prefix {
                    addr: r.prefix.addr.as_v4(),
                    len: r.prefix.len,
                },
                via: match r.via {
                    Some(IpAddr::V4(v)) => Some(v.octets()),
                    _ => None,
                },
                port: Some(r.port),
            })
            .collect(),
        ..GatewayConfig::default()
    }
}

/// The gateway of `cfg`.
///
/// # Errors
/// The first port or route the gateway refuses, by its key.
pub fn gateway(cfg: &AgentConfig) -> Result<Gateway, GatewayConfigError> {
    let full = gateway_config(cfg);
    // Each route alone over the ports, so that the error names the route.
    let ports_only = GatewayConfig {
        routes: Vec::new(),
        ..full.clone()
    };
    Gateway::new(ports_only.clone()).map_err(|source| GatewayConfigError {
        key: "ports".into(),
        source,
    })?;
    let v4_routes = cfg
        .routes
        .iter()
        .enumerate()
        .filter(|(_, r)| r.prefix.family == Family::V4)
        .map(|(i, _)| i);
    for (i, route) in v4_routes.zip(&full.routes) {
        // A next hop must be on a connected prefix of the route's port.
        if let (Some(via), Some(port)) = (route.via, route.port) {
            let on_port = full.ports.get(port).is_some_and(|p| {
                p.addrs
                    .iter()
                    .any(|&(addr, len)| Prefix { addr, len }.contains(via))
            });
            if !on_port {
                return Err(GatewayConfigError {
                    key: format!("routes[{i}].via"),
                    source: ConfigError::NextHopNotConnected {
                        prefix: route.prefix,
                        via,
                    },
                });
            }
        }
        let one = GatewayConfig {
            routes: vec![*route],
            ..ports_only.clone()
        };
        Gateway::new(one).map_err(|source| GatewayConfigError {
            key: format!("routes[{i}]"),
            source,
        })?;
    }
    Gateway::new(full).map_err(|source| GatewayConfigError {
        key: "routes".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, parse};

    const PORTS: &str = r#"
[[ports]]
name = "inside"
mac = "02:00:00:00:00:01"
addresses = ["10.0.0.1/24", "2001:db8::1/64"]

[[ports]]
name = "outside"
mac = "02:00:00:00:01:01"
addresses = ["192.0.2.1/24"]
"#;

    #[test]
    fn sim_interfaces_one_per_port() {
        let cfg = parse(&format!(
            "[backend]\nkind = \"sim\"\ninterfaces = [\"veth0\", \"veth1\"]\n{PORTS}"
        ))
        .expect("valid");
        assert_eq!(
            cfg.backend,
            Backend::Sim {
                table_size: None,
                interfaces: vec!["veth0".into(), "veth1".into()],
                sim_socket: None,
            }
        );
        let e = parse(&format!(
            "[backend]\nkind = \"sim\"\ninterfaces = [\"veth0\"]\n{PORTS}"
        ))
        .expect_err("one interface for two ports");
        assert_eq!(e.key(), Some("backend.interfaces"));
        let e = parse("[backend]\nkind = \"sim\"\ninterfaces = [\"a/b\"]\n").expect_err("name");
        assert_eq!(e.key(), Some("backend.interfaces[0]"));
    }

    #[test]
    fn ports_and_ipv4_routes_become_the_gateway_and_errors_name_the_route() {
        let routes = r#"
[[routes]]
prefix = "198.51.100.0/24"
via = "192.0.2.254"
port = "outside"

[[routes]]
prefix = "2001:db8:1::/48"
via = "2001:db8::2"
port = "inside"

[[routes]]
prefix = "203.0.113.0/24"
via = "10.0.0.254"
port = "inside"
"#;
        let cfg = parse(&format!("{PORTS}{routes}")).expect("valid");
        let g = gateway_config(&cfg);
        assert_eq!(g.ports[0].addrs, vec![([10, 0, 0, 1], 24)], "IPv4 only");
        assert_eq!(g.routes.len(), 2, "IPv6 route left out");
        let gw = gateway(&cfg).expect("gateway");
        let hop = gw.route([198, 51, 100, 7]).expect("routed");
        assert_eq!((hop.port, hop.next_hop), (1, [192, 0, 2, 254]));

        // A next hop on no connected prefix: the third route (index 2) is named.
        let bad = routes.replace("10.0.0.254", "172.16.0.1");
        let cfg = parse(&format!("{PORTS}{bad}")).expect("parses");
        let e = gateway(&cfg).expect_err("unreachable next hop");
        assert_eq!(e.key, "routes[2].via");
        // On a connected prefix, but of another port.
        let bad = routes.replace("10.0.0.254", "192.0.2.9");
        let cfg = parse(&format!("{PORTS}{bad}")).expect("parses");
        let e = gateway(&cfg).expect_err("next hop on the other port");
        assert_eq!(e.key, "routes[2].via");
    }
}
