//! Ethernet frames for end-to-end tests, built with etherparse (an implementation
//! independent of ours) with correct IPv4 and L4 checksums, so that a kernel with
//! `nf_conntrack_checksum=1` and our parser both accept them.

use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{Icmpv4Type, PacketBuilder};

/// Length of an Ethernet II header without VLAN tags.
pub const ETH_HEADER_LEN: usize = 14;

/// Source and destination MAC addresses of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2 {
    /// Source MAC.
    pub src: [u8; 6],
    /// Destination MAC.
    pub dst: [u8; 6],
}

/// An IPv4 address and a port.
pub type Sock = ([u8; 4], u16);

/// TCP header flags to set, besides ACK (which [`tcp`] sets when given an ack number).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpFlags {
    /// SYN.
    pub syn: bool,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
    /// PSH.
    pub psh: bool,
}

impl TcpFlags {
    /// Parse `"S"`, `"F"`, `"R"`, `"P"` or combinations (`"SF"`); other letters are
    /// ignored.
    #[must_use]
    pub fn parse(s: &str) -> Self {
        Self {
            syn: s.contains('S'),
            fin: s.contains('F'),
            rst: s.contains('R'),
            psh: s.contains('P'),
        }
    }
}

/// Window every crafted TCP segment advertises (no window scaling).
pub const TCP_WINDOW: u16 = 64240;

/// An IPv4 TCP segment; `ack` sets the ACK flag.
///
/// # Panics
/// If etherparse cannot serialize the packet (payload over 64 KiB).
#[must_use]
pub fn tcp(
    l2: L2,
    src: Sock,
    dst: Sock,
    seq: u32,
    ack: Option<u32>,
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    let f = TcpFlags::parse(flags);
    let mut b = PacketBuilder::ethernet2(l2.src, l2.dst)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, seq, TCP_WINDOW);
    if f.syn {
        b = b.syn();
    }
    if f.fin {
        b = b.fin();
    }
    if f.rst {
        b = b.rst();
    }
    if f.psh {
        b = b.psh();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("tcp frame");
    v
}

/// An IPv4 UDP datagram.
///
/// # Panics
/// If etherparse cannot serialize the packet (payload over 64 KiB).
#[must_use]
pub fn udp(l2: L2, src: Sock, dst: Sock, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(l2.src, l2.dst)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut v, payload)
        .expect("udp frame");
    v
}

/// An ICMP echo request (or reply) with identifier `id` and sequence `seq`.
///
/// # Panics
/// Never for the payload sizes tests use.
#[must_use]
pub fn icmp_echo(l2: L2, src: [u8; 4], dst: [u8; 4], reply: bool, id: u16, seq: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(l2.src, l2.dst).ipv4(src, dst, 64);
    let b = if reply {
        b.icmpv4_echo_reply(id, seq)
    } else {
        b.icmpv4_echo_request(id, seq)
    };
    let mut v = Vec::new();
    b.write(&mut v, b"ping-payload").expect("icmp frame");
    v
}

/// An ICMP destination-unreachable error (`code`: 1 host, 3 port) quoting the IP
/// header and first 8 L4 bytes of `quoted_frame` (an Ethernet frame).
///
/// # Panics
/// If `quoted_frame` is shorter than an Ethernet and IPv4 header.
#[must_use]
pub fn icmp_unreachable(
    l2: L2,
    src: [u8; 4],
    dst: [u8; 4],
    code: u8,
    quoted_frame: &[u8],
) -> Vec<u8> {
    let ip = &quoted_frame[ETH_HEADER_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let quote = &ip[..(ihl + 8).min(ip.len())];
    let header = match code {
        0 => DestUnreachableHeader::Network,
        1 => DestUnreachableHeader::Host,
        2 => DestUnreachableHeader::Protocol,
        _ => DestUnreachableHeader::Port,
    };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(l2.src, l2.dst)
        .ipv4(src, dst, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(header))
        .write(&mut v, quote)
        .expect("icmp error frame");
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::SlicedPacket;

    const L: L2 = L2 {
        src: [2, 0, 0, 0, 0, 1],
        dst: [2, 0, 0, 0, 0, 2],
    };

    #[test]
    fn frames_parse_back() {
        let t = tcp(
            L,
            ([10, 0, 0, 1], 1),
            ([10, 0, 0, 2], 2),
            7,
            Some(9),
            "SP",
            b"x",
        );
        let p = SlicedPacket::from_ethernet(&t).expect("tcp");
        match p.transport {
            Some(etherparse::TransportSlice::Tcp(h)) => {
                assert!(h.syn() && h.ack() && h.psh() && !h.fin());
                assert_eq!((h.sequence_number(), h.acknowledgment_number()), (7, 9));
            }
            other => panic!("{other:?}"),
        }
        let u = udp(L, ([10, 0, 0, 1], 1), ([10, 0, 0, 2], 2), b"abc");
        let e = icmp_unreachable(L, [10, 0, 0, 2], [10, 0, 0, 1], 3, &u);
        // 14 + 20 + 8 (ICMP) + 20 + 8 (quote)
        assert_eq!(e.len(), 70);
        assert_eq!(&e[42..62], &u[14..34]);
        let ping = icmp_echo(L, [10, 0, 0, 1], [10, 0, 0, 2], false, 5, 1);
        assert_eq!(ping[34], 8);
    }
}
