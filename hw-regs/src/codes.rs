//! Enumerated codes of registers and descriptors.
//!
//! Each enum converts from its raw value with `TryFrom` (unknown values give an
//! [`Error`] holding the value) and back with `From`. Structures read from device or DMA
//! memory keep the raw value; these enums are what software decodes it into.

use crate::Error;

macro_rules! code_enum {
    (
        $(#[$doc:meta])*
        $name:ident : $repr:ty, $err:ident {
            $( $(#[$vdoc:meta])* $variant:ident = $value:literal, )+
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $( $(#[$vdoc])* $variant = $value, )+
        }

        impl $name {
            /// Every defined code, in ascending order of value.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The raw value.
            #[must_use]
            pub const fn raw(self) -> $repr {
                self as $repr
            }
        }

        impl TryFrom<$repr> for $name {
            type Error = Error;

            fn try_from(value: $repr) -> Result<Self, Error> {
                match value {
                    $( $value => Ok(Self::$variant), )+
                    _ => Err(Error::$err { value }),
                }
            }
        }

        impl From<$name> for $repr {
            fn from(code: $name) -> Self {
                code.raw()
            }
        }
    };
}

code_enum! {
    /// Command opcode, descriptor byte 0 (device.md section 6.2).
    Opcode: u8, UnknownOpcode {
        /// No operation; completes with `OK`.
        Nop = 0,
        /// Install a flow (key + action); the device picks the slot.
        FlowInsert = 1,
        /// Remove a flow by `flow_id` (key must match) or by key (`BY_KEY`).
        FlowDelete = 2,
        /// Replace the action of a flow (`flow_id` + matching key); counters kept.
        FlowModify = 3,
        /// Look a key up; returns its `flow_id`, generation and counters.
        FlowQuery = 4,
        /// Write table records for a slot range to host memory.
        TableDump = 5,
        /// Write counter records for a slot range to host memory.
        CounterDump = 6,
    }
}

code_enum! {
    /// Completion status, completion byte 28 (device.md section 7.2).
    CompletionStatus: u8, UnknownCompletionStatus {
        /// Success.
        Ok = 0,
        /// Insert: the key is already installed; the completion names the existing entry.
        Exists = 1,
        /// No such entry (or the slot holds another key).
        NotFound = 2,
        /// Insert: `FLOW_COUNT` reached `FLOW_LIMIT`.
        TableFull = 3,
        /// Insert: every way of the key's bucket is in use.
        BucketFull = 4,
        /// The descriptor failed validation; no effect.
        BadDescriptor = 5,
        /// Internal failure; no effect; may be retried.
        DeviceError = 6,
    }
}

code_enum! {
    /// `FATAL_CODE` register (device.md section 4.6).
    FatalCode: u32, UnknownFatalCode {
        /// No fatal error.
        None = 0,
        /// DMA failure (unmapped IOVA, IOMMU fault, completion error); see `FATAL_ADDR`.
        DmaError = 1,
        /// Invalid ring configuration at enable, or ring registers written while enabled.
        RingConfig = 2,
        /// Doorbell value out of range while enabled.
        BadDoorbell = 3,
        /// Uncorrectable parity/ECC error in internal memory.
        Parity = 4,
        /// Command-processor watchdog expired.
        CmdHang = 5,
        /// Other internal inconsistency.
        Internal = 6,
    }
}

code_enum! {
    /// `FATAL_UNIT` register: which unit failed (device.md section 4.6).
    FatalUnit: u32, UnknownFatalUnit {
        /// Not attributable, or no error.
        None = 0,
        /// Command ring.
        CmdRing = 1,
        /// Completion ring.
        CplRing = 2,
        /// Exception RX ring descriptors.
        RxRing = 3,
        /// TX ring descriptors.
        TxRing = 4,
        /// Host buffer of a dump command.
        DumpBuffer = 5,
        /// RX packet buffer.
        RxBuffer = 6,
        /// TX packet buffer.
        TxBuffer = 7,
        /// Flow table or counter memory.
        FlowTable = 8,
        /// Command processor.
        CmdProcessor = 9,
    }
}

code_enum! {
    /// Punt reason, RX descriptor byte 25 (device.md section 13.2).
    RxReason: u8, UnknownRxReason {
        /// No entry matches the key.
        Miss = 1,
        /// `PUNT_TCP_CTRL` entry hit by a TCP segment with SYN, FIN or RST.
        TcpCtrl = 2,
        /// `DEC_TTL` entry hit by a packet with TTL/hop limit ≤ 1.
        TtlExpired = 3,
        /// IPv4 fragment, or IPv6 with a Fragment header.
        Fragment = 4,
        /// IPv4 header with options.
        IpOptions = 5,
        /// IPv6 extension header other than Fragment.
        Ipv6Ext = 6,
        /// Other L4 protocol, or ICMP other than echo request/reply.
        UnsupportedL4 = 7,
        /// Truncated or inconsistent headers.
        Malformed = 8,
        /// Not IPv4/IPv6, or stacked VLAN tags.
        NonIp = 9,
    }
}

code_enum! {
    /// Flow key kind, key byte 0 (device.md section 8.1).
    KeyKind: u8, UnknownKeyKind {
        /// IPv4 addresses in bytes 0–3 of the address fields.
        Ipv4 = 1,
        /// IPv6 addresses.
        Ipv6 = 2,
    }
}

code_enum! {
    /// IP protocol numbers a flow key can carry, key byte 2 (device.md section 8.1).
    L4Proto: u8, UnknownL4Proto {
        /// ICMP (IPv4 keys only); ports hold the echo identifier and type/code.
        Icmp = 1,
        /// TCP.
        Tcp = 6,
        /// UDP.
        Udp = 17,
        /// ICMPv6 (IPv6 keys only); ports hold the echo identifier and type/code.
        Icmpv6 = 58,
    }
}

code_enum! {
    /// TX error code, TX descriptor byte 13 (device.md section 14.1).
    TxError: u8, UnknownTxError {
        /// No error.
        None = 0,
        /// `len` < 14 or > `MAX_FRAME_LEN`.
        BadLength = 1,
        /// `port` ≥ `NUM_PORTS`.
        BadPort = 2,
        /// Reserved bytes not zero.
        BadDescriptor = 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes every raw value of a `u8` code: the defined ones round-trip to the golden
    /// list, every other value is rejected with itself in the error.
    fn check_u8<T>(golden: &[(u8, T)], reject: impl Fn(u8) -> Error)
    where
        T: TryFrom<u8, Error = Error> + Into<u8> + Copy + PartialEq + core::fmt::Debug,
    {
        for raw in 0..=u8::MAX {
            match golden.iter().find(|(v, _)| *v == raw) {
                Some((_, code)) => {
                    assert_eq!(T::try_from(raw), Ok(*code));
                    assert_eq!((*code).into(), raw);
                }
                None => assert_eq!(T::try_from(raw), Err(reject(raw))),
            }
        }
    }

    #[test]
    fn opcodes() {
        use Opcode::*;
        let golden = [
            (0, Nop),
            (1, FlowInsert),
            (2, FlowDelete),
            (3, FlowModify),
            (4, FlowQuery),
            (5, TableDump),
            (6, CounterDump),
        ];
        assert_eq!(Opcode::ALL.len(), golden.len());
        check_u8(&golden, |value| Error::UnknownOpcode { value });
    }

    #[test]
    fn completion_statuses() {
        use CompletionStatus::*;
        let golden = [
            (0, Ok),
            (1, Exists),
            (2, NotFound),
            (3, TableFull),
            (4, BucketFull),
            (5, BadDescriptor),
            (6, DeviceError),
        ];
        assert_eq!(CompletionStatus::ALL.len(), golden.len());
        check_u8(&golden, |value| Error::UnknownCompletionStatus { value });
    }

    #[test]
    fn rx_reasons() {
        use RxReason::*;
        let golden = [
            (1, Miss),
            (2, TcpCtrl),
            (3, TtlExpired),
            (4, Fragment),
            (5, IpOptions),
            (6, Ipv6Ext),
            (7, UnsupportedL4),
            (8, Malformed),
            (9, NonIp),
        ];
        assert_eq!(RxReason::ALL.len(), golden.len());
        check_u8(&golden, |value| Error::UnknownRxReason { value });
    }

    #[test]
    fn key_kinds_and_protocols() {
        check_u8(&[(1, KeyKind::Ipv4), (2, KeyKind::Ipv6)], |value| {
            Error::UnknownKeyKind { value }
        });
        check_u8(
            &[
                (1, L4Proto::Icmp),
                (6, L4Proto::Tcp),
                (17, L4Proto::Udp),
                (58, L4Proto::Icmpv6),
            ],
            |value| Error::UnknownL4Proto { value },
        );
    }

    #[test]
    fn tx_errors() {
        use TxError::*;
        let golden = [(0, None), (1, BadLength), (2, BadPort), (3, BadDescriptor)];
        assert_eq!(TxError::ALL.len(), golden.len());
        check_u8(&golden, |value| Error::UnknownTxError { value });
    }

    #[test]
    fn fatal_codes() {
        use FatalCode::*;
        let golden = [
            (0, None),
            (1, DmaError),
            (2, RingConfig),
            (3, BadDoorbell),
            (4, Parity),
            (5, CmdHang),
            (6, Internal),
        ];
        assert_eq!(FatalCode::ALL.len(), golden.len());
        for (raw, code) in golden {
            assert_eq!(FatalCode::try_from(raw), Ok(code));
            assert_eq!(u32::from(code), raw);
        }
        for value in [7, 8, 0xFF, 0x100, 0xFFFF_FFFF] {
            assert_eq!(
                FatalCode::try_from(value),
                Err(Error::UnknownFatalCode { value })
            );
        }
    }

    #[test]
    fn fatal_units() {
        use FatalUnit::*;
        let golden = [
            (0, None),
            (1, CmdRing),
            (2, CplRing),
            (3, RxRing),
            (4, TxRing),
            (5, DumpBuffer),
            (6, RxBuffer),
            (7, TxBuffer),
            (8, FlowTable),
            (9, CmdProcessor),
        ];
        assert_eq!(FatalUnit::ALL.len(), golden.len());
        for (raw, unit) in golden {
            assert_eq!(FatalUnit::try_from(raw), Ok(unit));
            assert_eq!(u32::from(unit), raw);
        }
        for value in [10, 0x8000_0000, 0xFFFF_FFFF] {
            assert_eq!(
                FatalUnit::try_from(value),
                Err(Error::UnknownFatalUnit { value })
            );
        }
    }
}
