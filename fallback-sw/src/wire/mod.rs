//! Zero-copy packet views and the one-shot classifier of the hot path.
//!
//! Each header has a `Packet<T: AsRef<[u8]>>` view in the style of smoltcp's `wire`:
//! `new_unchecked` wraps any buffer, `new_checked` validates the lengths of untrusted
//! input so that afterwards no accessor panics, getters read fields in network byte
//! order, and setters exist when `T: AsMut<[u8]>`.
//!
//! [`parse::parse`] walks L2 → L3 → L4 once and returns a small `Copy`
//! [`parse::ParsedPacket`]; [`parse::parse_inner`] does the same for the packet quoted
//! inside an ICMP error. Every failure is a [`ParseError`], and
//! [`ParseError::reason`] maps it to a [`DropReason`] for per-reason drop counters.
//!
//! Nothing here allocates, and nothing panics on any input.

pub mod ethernet;
pub mod icmp;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod parse;
pub mod tcp;
pub mod udp;

pub use parse::{
    Fragment, InnerPacket, L3, L4, ParseOptions, ParsedPacket, TcpInfo, parse, parse_inner,
};
pub(crate) use parse::{PlainUdp, PlainV4, V4Layout, parse_walk, plain_udp_v4, plain_v4};

#[cfg(test)]
mod fixtures;

/// IP protocol numbers (IANA "Assigned Internet Protocol Numbers") used by the parsers.
pub mod ip_proto {
    /// IPv6 Hop-by-Hop Options.
    pub const HOPOPT: u8 = 0;
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// DCCP (a port protocol).
    pub const DCCP: u8 = 33;
    /// IPv6 Routing header.
    pub const IPV6_ROUTE: u8 = 43;
    /// IPv6 Fragment header.
    pub const IPV6_FRAG: u8 = 44;
    /// GRE.
    pub const GRE: u8 = 47;
    /// Encapsulating Security Payload.
    pub const ESP: u8 = 50;
    /// Authentication Header.
    pub const AH: u8 = 51;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 No Next Header.
    pub const IPV6_NONXT: u8 = 59;
    /// IPv6 Destination Options.
    pub const IPV6_OPTS: u8 = 60;
    /// SCTP (a port protocol).
    pub const SCTP: u8 = 132;
    /// UDP-Lite (a port protocol).
    pub const UDPLITE: u8 = 136;
}

/// The header a [`ParseError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// Ethernet II header.
    Ethernet,
    /// 802.1Q / 802.1ad VLAN tag.
    Vlan,
    /// IPv4 header.
    Ipv4,
    /// IPv6 fixed header.
    Ipv6,
    /// IPv6 extension header.
    Ipv6Ext,
    /// TCP header.
    Tcp,
    /// UDP header.
    Udp,
    /// ICMP (v4) header.
    Icmp,
    /// ICMPv6 header.
    Icmpv6,
    /// The port words of another port protocol (SCTP, DCCP, UDP-Lite).
    Ports,
}

impl Layer {
    /// Whether this is a link-, network- or transport-layer header (2, 3 or 4).
    #[inline]
    #[must_use]
    pub const fn level(self) -> u8 {
        match self {
            Self::Ethernet | Self::Vlan => 2,
            Self::Ipv4 | Self::Ipv6 | Self::Ipv6Ext => 3,
            Self::Tcp | Self::Udp | Self::Icmp | Self::Icmpv6 | Self::Ports => 4,
        }
    }
}

impl core::fmt::Display for Layer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = match self {
            Self::Ethernet => "ethernet",
            Self::Vlan => "vlan",
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::Ipv6Ext => "ipv6 extension",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
            Self::Ports => "l4 ports",
        };
        f.write_str(s)
    }
}

/// Why a packet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The buffer ends before the header (or the length its header claims) does.
    #[error("{layer} truncated: needs {needed} bytes, {available} available")]
    Truncated {
        /// The header being read.
        layer: Layer,
        /// Bytes needed from the start of that header.
        needed: usize,
        /// Bytes available from the start of that header.
        available: usize,
    },
    /// The IP version nibble is not the one the ethertype (or outer packet) announced.
    #[error("ip version {found}, expected {expected}")]
    BadIpVersion {
        /// The version the context calls for (4 or 6).
        expected: u8,
        /// The version nibble found.
        found: u8,
    },
    /// IPv4 IHL below 5.
    #[error("ipv4 ihl {ihl} below 5")]
    BadIhl {
        /// The IHL field (32-bit words).
        ihl: u8,
    },
    /// IPv4 total length smaller than its header.
    #[error("ipv4 total length {total_len} smaller than header length {header_len}")]
    BadTotalLength {
        /// The total-length field.
        total_len: u16,
        /// The header length from IHL.
        header_len: usize,
    },
    /// TCP data offset below 5 or beyond the segment.
    #[error("tcp data offset {data_offset} invalid for a {available}-byte segment")]
    BadTcpDataOffset {
        /// The data-offset field (32-bit words).
        data_offset: u8,
        /// Bytes of TCP segment available.
        available: usize,
    },
    /// UDP length field below 8 or beyond the datagram.
    #[error("udp length {length} invalid for a {available}-byte datagram")]
    BadUdpLength {
        /// The length field.
        length: u16,
        /// Bytes of UDP datagram available.
        available: usize,
    },
    /// A checksum did not verify (only when the options ask to verify).
    #[error("bad {layer} checksum")]
    BadChecksum {
        /// The header whose checksum failed.
        layer: Layer,
    },
    /// More IPv6 extension headers than the walk accepts.
    #[error("more than {limit} ipv6 extension headers")]
    TooManyExtHeaders {
        /// The limit.
        limit: usize,
    },
    /// More than two VLAN tags.
    #[error("more than {limit} vlan tags")]
    TooManyVlanTags {
        /// The limit.
        limit: usize,
    },
    /// [`parse_inner`] was called for a packet that is not an ICMP error.
    #[error("packet is not an icmp error")]
    NotIcmpError,
}

/// A compact, countable form of [`ParseError`]: index an array of counters with
/// [`DropReason::index`], sized [`DropReason::COUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DropReason {
    /// Truncated Ethernet header or VLAN tag.
    TruncatedL2,
    /// Truncated IP header, IPv6 extension header or IP payload.
    TruncatedL3,
    /// Truncated transport header.
    TruncatedL4,
    /// Wrong IP version nibble.
    BadIpVersion,
    /// IPv4 IHL below 5.
    BadIhl,
    /// IPv4 total length smaller than its header.
    BadTotalLength,
    /// Bad TCP data offset.
    BadTcpDataOffset,
    /// Bad UDP length.
    BadUdpLength,
    /// IPv4 header checksum failed.
    BadChecksumL3,
    /// TCP/UDP/ICMP/ICMPv6 checksum failed.
    BadChecksumL4,
    /// Too many IPv6 extension headers.
    TooManyExtHeaders,
    /// Too many VLAN tags.
    TooManyVlanTags,
    /// Not an ICMP error where one was required.
    NotIcmpError,
}

impl DropReason {
    /// Number of reasons: the length of a per-reason counter array.
    pub const COUNT: usize = 13;

    /// Every reason, in index order.
    pub const ALL: [Self; Self::COUNT] = [
        Self::TruncatedL2,
        Self::TruncatedL3,
        Self::TruncatedL4,
        Self::BadIpVersion,
        Self::BadIhl,
        Self::BadTotalLength,
        Self::BadTcpDataOffset,
        Self::BadUdpLength,
        Self::BadChecksumL3,
        Self::BadChecksumL4,
        Self::TooManyExtHeaders,
        Self::TooManyVlanTags,
        Self::NotIcmpError,
    ];

    /// Position of this reason in a counter array (`< COUNT`).
    #[inline]
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A stable snake_case name, for metric labels.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::TruncatedL2 => "truncated_l2",
            Self::TruncatedL3 => "truncated_l3",
            Self::TruncatedL4 => "truncated_l4",
            Self::BadIpVersion => "bad_ip_version",
            Self::BadIhl => "bad_ihl",
            Self::BadTotalLength => "bad_total_length",
            Self::BadTcpDataOffset => "bad_tcp_data_offset",
            Self::BadUdpLength => "bad_udp_length",
            Self::BadChecksumL3 => "bad_checksum_l3",
            Self::BadChecksumL4 => "bad_checksum_l4",
            Self::TooManyExtHeaders => "too_many_ext_headers",
            Self::TooManyVlanTags => "too_many_vlan_tags",
            Self::NotIcmpError => "not_icmp_error",
        }
    }
}

impl ParseError {
    /// The counter this error is accounted under.
    #[inline]
    #[must_use]
    pub const fn reason(&self) -> DropReason {
        match self {
            Self::Truncated { layer, .. } => match layer.level() {
                2 => DropReason::TruncatedL2,
                3 => DropReason::TruncatedL3,
                _ => DropReason::TruncatedL4,
            },
            Self::BadIpVersion { .. } => DropReason::BadIpVersion,
            Self::BadIhl { .. } => DropReason::BadIhl,
            Self::BadTotalLength { .. } => DropReason::BadTotalLength,
            Self::BadTcpDataOffset { .. } => DropReason::BadTcpDataOffset,
            Self::BadUdpLength { .. } => DropReason::BadUdpLength,
            Self::BadChecksum { layer } => {
                if layer.level() == 3 {
                    DropReason::BadChecksumL3
                } else {
                    DropReason::BadChecksumL4
                }
            }
            Self::TooManyExtHeaders { .. } => DropReason::TooManyExtHeaders,
            Self::TooManyVlanTags { .. } => DropReason::TooManyVlanTags,
            Self::NotIcmpError => DropReason::NotIcmpError,
        }
    }
}

/// `Err(Truncated)` unless `buf` holds `needed` bytes.
#[inline]
pub(crate) fn need(layer: Layer, buf: &[u8], needed: usize) -> Result<(), ParseError> {
    if buf.len() < needed {
        Err(ParseError::Truncated {
            layer,
            needed,
            available: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Reads a big-endian u16 at `at` (caller has checked the length).
#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian u32 at `at` (caller has checked the length).
#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Writes a big-endian u16 at `at`.
#[inline]
pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u32 at `at`.
#[inline]
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reason_indices_are_dense() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let e = ParseError::Truncated {
            layer: Layer::Tcp,
            needed: 20,
            available: 3,
        };
        assert_eq!(e.reason(), DropReason::TruncatedL4);
        assert_eq!(e.to_string(), "tcp truncated: needs 20 bytes, 3 available");
        assert_eq!(
            ParseError::BadChecksum { layer: Layer::Ipv4 }.reason(),
            DropReason::BadChecksumL3
        );
    }
}
