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
    /// The configuration key (`routes[2]`, `ports[0].addresses`).
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
