//! The ctoffload gRPC/protobuf API (`ctoffload.v1`): messages and tonic clients and
//! servers generated from `proto/ctoffload/v1/ctoffload.proto`.
//!
//! This crate holds wire types only: no logic, no validation (the agent's `api`
//! module validates and converts), and no dependency on the rest of the workspace.
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

/// Version 1 of the API (`package ctoffload.v1`). The messages, enums and services
/// are documented in the `.proto` file and in `docs/api.md`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("ctoffload.v1");
}

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn messages_round_trip() {
        let rule = v1::NatRule {
            name: "snat-out".into(),
            kind: v1::NatKind::Snat.into(),
            to_addresses: Some(v1::AddressRange {
                first: "192.0.2.1".into(),
                last: "192.0.2.8".into(),
            }),
            to_ports: Some(v1::PortRange {
                first: 1024,
                last: 65535,
            }),
            ..Default::default()
        };
        let bytes = rule.encode_to_vec();
        let back = v1::NatRule::decode(bytes.as_slice()).expect("decode");
        assert_eq!(back, rule);
        assert_eq!(v1::TcpState::Established as i32, 3, "Linux numbering");
    }
}
