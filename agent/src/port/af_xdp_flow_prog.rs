//! The XDP flow table program: established flows NATed and forwarded inside the XDP
//! program, everything else handed to the redirect program of [`super::prog`] (the
//! AF_XDP socket of the frame's queue, or the kernel). On a plain NIC this is the
//! "hardware flow table" (what Linux flowtable, Cilium or Katran do in XDP): no skb, no
//! copy to user space, no context switch for a packet of an established flow.
//!
//! The map is a BPF hash map of [`FlowKey`] (ingress interface and the 5-tuple as the
//! packet carries it on the wire) to [`FlowEntry`] (the rewrite, precomputed checksum
//! deltas, the egress interface and MACs, and the counters the program updates). One
//! map serves every interface of a forwarder (the key holds the ingress ifindex).
//!
//! Fast-pathed: Ethernet + IPv4 without options, not a fragment, TTL above 1, TCP
//! without SYN/FIN/RST or UDP, with a map entry. Then, in order: the addresses and
//! ports of the entry, TTL - 1, the IPv4 header checksum and the L4 checksum adjusted
//! by the entry's RFC 1624 deltas (a zero UDP checksum, "none", stays zero; an adjusted
//! one that comes out zero is written as 0xffff), the entry's MACs, the counters
//! (atomic add of one packet and the IPv4 total length; last-seen from
//! `bpf_ktime_get_ns`) and `bpf_redirect` to the egress interface. Everything else
//! (a miss, TCP SYN/FIN/RST so that teardown is seen, TTL <= 1 so the slow path sends
//! ICMP time exceeded, IP options, fragments, VLAN, runts) goes on to the socket.
//!
//! Checksums are adjusted, never recomputed: a frame whose L4 checksum is partial
//! (CHECKSUM_PARTIAL from a local stack on veth, which XDP cannot tell) leaves with a
//! wrong one; see docs/af_xdp.md ("XDP flow table") for what the deployment must do.

use super::prog::{
    ADD64_K, BpfInsn, CALL, EXIT, JEQ_K, JGT_X, LD_IMM64, LDX_H, LDX_W, MOV64_K, MOV64_X,
    PSEUDO_MAP_FD, R0, R1, R2, R3, insn, redirect_program,
};

/// Size of [`FlowKey`] in the map.
pub const KEY_SIZE: usize = 20;
/// Size of [`FlowEntry`] in the map.
pub const ENTRY_SIZE: usize = 64;

/// The map key: where a packet arrived and the 5-tuple it carries (addresses and ports
/// in network byte order, as on the wire).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Ingress interface index (`xdp_md.ingress_ifindex`).
    pub ifindex: u32,
    /// IPv4 source address.
    pub src: [u8; 4],
    /// IPv4 destination address.
    pub dst: [u8; 4],
    /// Source port.
    pub sport: [u8; 2],
    /// Destination port.
    pub dport: [u8; 2],
    /// IP protocol (6 or 17).
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// The map value: the rewrite of one direction of a connection and its counters.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// Source address written into the packet.
    pub new_src: [u8; 4],
    /// Destination address written into the packet.
    pub new_dst: [u8; 4],
    /// Source port written into the packet.
    pub new_sport: [u8; 2],
    /// Destination port written into the packet.
    pub new_dport: [u8; 2],
    /// One's-complement sum (folded to 16 bits, in the host's load order) the IPv4
    /// header checksum changes by: the addresses and the TTL decrement.
    pub ip_delta: u32,
    /// The same for the TCP/UDP checksum: addresses (pseudo-header) and ports.
    pub l4_delta: u32,
    /// Egress interface index (`bpf_redirect`).
    pub out_ifindex: u32,
    /// Destination MAC written into the frame.
    pub dst_mac: [u8; 6],
    /// Source MAC written into the frame.
    pub src_mac: [u8; 6],
    /// Zero (reserved).
    pub flags: u32,
    /// Packets the program forwarded (atomic add).
    pub packets: u64,
    /// Their bytes (IPv4 total length, as conntrack counts).
    pub bytes: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet, 0: none yet.
    pub last_seen_ns: u64,
}

impl FlowKey {
    /// The bytes the map stores.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; KEY_SIZE] {
        let mut b = [0u8; KEY_SIZE];
        b[0..4].copy_from_slice(&self.ifindex.to_ne_bytes());
        b[4..8].copy_from_slice(&self.src);
        b[8..12].copy_from_slice(&self.dst);
        b[12..14].copy_from_slice(&self.sport);
        b[14..16].copy_from_slice(&self.dport);
        b[16] = self.proto;
        b
    }
}

fn ne_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_ne_bytes(a)
}

fn ne_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_ne_bytes(a)
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

impl FlowEntry {
    /// The bytes the map stores.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        b[0..4].copy_from_slice(&self.new_src);
        b[4..8].copy_from_slice(&self.new_dst);
        b[8..10].copy_from_slice(&self.new_sport);
        b[10..12].copy_from_slice(&self.new_dport);
        b[12..16].copy_from_slice(&self.ip_delta.to_ne_bytes());
        b[16..20].copy_from_slice(&self.l4_delta.to_ne_bytes());
        b[20..24].copy_from_slice(&self.out_ifindex.to_ne_bytes());
        b[24..30].copy_from_slice(&self.dst_mac);
        b[30..36].copy_from_slice(&self.src_mac);
        b[36..40].copy_from_slice(&self.flags.to_ne_bytes());
        b[40..48].copy_from_slice(&self.packets.to_ne_bytes());
        b[48..56].copy_from_slice(&self.bytes.to_ne_bytes());
        b[56..64].copy_from_slice(&self.last_seen_ns.to_ne_bytes());
        b
    }

    /// The entry of the map's bytes.
    #[must_use]
    pub fn from_bytes(b: &[u8; ENTRY_SIZE]) -> Self {
        Self {
            new_src: arr(&b[0..]),
            new_dst: arr(&b[4..]),
            new_sport: arr(&b[8..]),
            new_dport: arr(&b[10..]),
            ip_delta: ne_u32(&b[12..]),
            l4_delta: ne_u32(&b[16..]),
            out_ifindex: ne_u32(&b[20..]),
            dst_mac: arr(&b[24..]),
            src_mac: arr(&b[30..]),
            flags: ne_u32(&b[36..]),
            packets: ne_u64(&b[40..]),
            bytes: ne_u64(&b[48..]),
            last_seen_ns: ne_u64(&b[56..]),
        }
    }
}

/// One's-complement 16-bit words of `bytes` as the program loads them (host order of
/// the raw bytes: one's-complement sums are byte-order independent, RFC 1071 2(B)).
fn words(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_ne_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
}

fn fold(mut s: u32) -> u32 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// The RFC 1624 (eqn. 3) delta for fields changing from `old` to `new` (equal length):
/// the one's-complement sum of `~m + m'` over their words, folded.
#[must_use]
pub fn csum_delta(old: &[u8], new: &[u8]) -> u32 {
    let s = words(old)
        .zip(words(new))
        .fold(0u32, |s, (m, n)| fold(s + (!m & 0xffff) + n));
    fold(s)
}

/// The delta of a TTL decrement by one: the word (TTL, protocol) loses 0x0100.
#[must_use]
pub fn ttl_decrement_delta() -> u32 {
    // ~m + (m - 0x0100) == 0xffff - 0x0100 in one's complement, network order.
    u32::from(u16::from_ne_bytes(0xfeffu16.to_be_bytes()))
}

/// Adds two folded deltas.
#[must_use]
pub fn csum_add(a: u32, b: u32) -> u32 {
    fold(a + b)
}

/// What the program does to a checksum field holding `old` (as loaded) given `delta`.
#[must_use]
pub fn adjust(old: u16, delta: u32) -> u16 {
    let s = fold(u32::from(!old) + delta);
    !u16::try_from(s).unwrap_or(u16::MAX)
}

const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;

const LDX_B: u8 = 0x71;
const STX_B: u8 = 0x73;
const STX_H: u8 = 0x6b;
const STX_W: u8 = 0x63;
const STX_DW: u8 = 0x7b;
const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW, imm BPF_ADD
const ADD64_X: u8 = 0x0f;
const AND64_K: u8 = 0x57;
const XOR64_K: u8 = 0xa7;
const RSH64_K: u8 = 0x77;
const TO_BE: u8 = 0xdc; // BPF_ALU | BPF_END | BPF_TO_BE
const JA: u8 = 0x05;
const JNE_K: u8 = 0x55;
const JLT_K: u8 = 0xa5;
const JSET_K: u8 = 0x45;
const FN_MAP_LOOKUP: i32 = 1;
const FN_KTIME_GET_NS: i32 = 5;
const FN_REDIRECT: i32 = 23;

/// Jump targets of the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Miss,
    Lookup,
    Udp,
    L2,
    UdpStore,
}

/// A few instructions with forward jumps to labels, resolved at the end.
#[derive(Default)]
struct Asm {
    p: Vec<BpfInsn>,
    jumps: Vec<(usize, Label)>,
    labels: Vec<(Label, usize)>,
}

impl Asm {
    fn i(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.p.push(insn(code, dst, src, off, imm));
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.jumps.push((self.p.len(), to));
        self.i(code, dst, src, 0, imm);
    }
    fn label(&mut self, l: Label) {
        self.labels.push((l, self.p.len()));
    }
    /// `r1 = the checksum at packet offset `off` adjusted by the delta in r2`.
    fn csum_adjust(&mut self, off: i16) {
        self.i(LDX_H, R1, R7, off, 0);
        self.i(XOR64_K, R1, 0, 0, 0xffff);
        self.i(ADD64_X, R1, R2, 0, 0);
        self.i(MOV64_X, R3, R1, 0, 0);
        self.i(RSH64_K, R3, 0, 0, 16);
        self.i(AND64_K, R1, 0, 0, 0xffff);
        self.i(ADD64_X, R1, R3, 0, 0);
        self.i(XOR64_K, R1, 0, 0, 0xffff);
    }
    fn finish(mut self) -> Vec<BpfInsn> {
        for (at, to) in self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(l, _)| *l == to)
                .map_or(at + 1, |&(_, t)| t);
            let rel = isize::try_from(target).unwrap_or(0) - isize::try_from(at).unwrap_or(0) - 1;
            self.p[at].off = i16::try_from(rel).unwrap_or(0);
        }
        self.p
    }
}

/// Ethernet + IPv4 offsets the program reads.
mod off {
    pub const ETHERTYPE: i16 = 12;
    pub const VER_IHL: i16 = 14;
    pub const FRAG: i16 = 20;
    pub const TTL: i16 = 22;
    pub const PROTO: i16 = 23;
    pub const IP_CSUM: i16 = 24;
    pub const TOTAL_LEN: i16 = 16;
    pub const SRC: i16 = 26;
    pub const DST: i16 = 30;
    pub const PORTS: i16 = 34;
    pub const TCP_FLAGS: i16 = 47;
    pub const TCP_CSUM: i16 = 50;
    pub const UDP_CSUM: i16 = 40;
    /// Ethernet + IPv4 + UDP header.
    pub const UDP_END: i32 = 42;
    /// Ethernet + IPv4 + TCP header (without options).
    pub const TCP_END: i32 = 54;
}

/// The program over the flow map `flow_map` (a hash map of [`FlowKey`] to
/// [`FlowEntry`]), falling back to [`redirect_program`] over the XSKMAP `xsk_map`.
#[must_use]
pub fn flow_program(flow_map: i32, xsk_map: i32) -> Vec<BpfInsn> {
    let mut a = Asm::default();
    // r6 = ctx, r7 = data, r8 = data_end.
    a.i(MOV64_X, R6, R1, 0, 0);
    a.i(LDX_W, R7, R6, 0, 0);
    a.i(LDX_W, R8, R6, 4, 0);
    a.i(MOV64_X, R2, R7, 0, 0);
    a.i(ADD64_K, R2, 0, 0, off::UDP_END);
    a.jump(JGT_X, R2, R8, 0, Label::Miss);
    a.i(LDX_H, R2, R7, off::ETHERTYPE, 0);
    a.jump(
        JNE_K,
        R2,
        0,
        i32::from(u16::from_ne_bytes([0x08, 0x00])),
        Label::Miss,
    );
    a.i(LDX_B, R2, R7, off::VER_IHL, 0);
    a.jump(JNE_K, R2, 0, 0x45, Label::Miss);
    a.i(LDX_H, R2, R7, off::FRAG, 0);
    // MF and the fragment offset: 0x3fff in network order.
    a.jump(
        JSET_K,
        R2,
        0,
        i32::from(u16::from_ne_bytes([0x3f, 0xff])),
        Label::Miss,
    );
    a.i(LDX_B, R2, R7, off::TTL, 0);
    a.jump(JLT_K, R2, 0, 2, Label::Miss);
    a.i(LDX_B, R2, R7, off::PROTO, 0);
    a.jump(JEQ_K, R2, 0, 17, Label::Lookup);
    a.jump(JNE_K, R2, 0, 6, Label::Miss);
    a.i(MOV64_X, R3, R7, 0, 0);
    a.i(ADD64_K, R3, 0, 0, off::TCP_END);
    a.jump(JGT_X, R3, R8, 0, Label::Miss);
    a.i(LDX_B, R3, R7, off::TCP_FLAGS, 0);
    a.jump(JSET_K, R3, 0, 0x07, Label::Miss); // FIN | SYN | RST
    a.label(Label::Lookup);
    // The key at fp-24 (20 bytes, every byte written).
    a.i(LDX_W, R3, R6, 12, 0); // xdp_md.ingress_ifindex
    a.i(STX_W, R10, R3, -24, 0);
    a.i(LDX_W, R3, R7, off::SRC, 0);
    a.i(STX_W, R10, R3, -20, 0);
    a.i(LDX_W, R3, R7, off::DST, 0);
    a.i(STX_W, R10, R3, -16, 0);
    a.i(LDX_W, R3, R7, off::PORTS, 0);
    a.i(STX_W, R10, R3, -12, 0);
    a.i(STX_W, R10, R2, -8, 0); // protocol, then three zero bytes
    a.i(MOV64_X, R8, R2, 0, 0); // r8 = protocol from here on
    a.i(LD_IMM64, R1, PSEUDO_MAP_FD, 0, flow_map);
    a.i(0, 0, 0, 0, 0);
    a.i(MOV64_X, R2, R10, 0, 0);
    a.i(ADD64_K, R2, 0, 0, -24);
    a.i(CALL, 0, 0, 0, FN_MAP_LOOKUP);
    a.jump(JEQ_K, R0, 0, 0, Label::Miss);
    a.i(MOV64_X, R9, R0, 0, 0);
    // Addresses and ports.
    for (pkt, val) in [(off::SRC, 0), (off::DST, 4), (off::PORTS, 8)] {
        a.i(LDX_W, R1, R9, val, 0);
        a.i(STX_W, R7, R1, pkt, 0);
    }
    // TTL - 1 (above 1, checked).
    a.i(LDX_B, R1, R7, off::TTL, 0);
    a.i(ADD64_K, R1, 0, 0, -1);
    a.i(STX_B, R7, R1, off::TTL, 0);
    a.i(LDX_W, R2, R9, 12, 0);
    a.csum_adjust(off::IP_CSUM);
    a.i(STX_H, R7, R1, off::IP_CSUM, 0);
    a.i(LDX_W, R2, R9, 16, 0);
    a.jump(JEQ_K, R8, 0, 17, Label::Udp);
    a.csum_adjust(off::TCP_CSUM);
    a.i(STX_H, R7, R1, off::TCP_CSUM, 0);
    a.jump(JA, 0, 0, 0, Label::L2);
    a.label(Label::Udp);
    a.i(LDX_H, R1, R7, off::UDP_CSUM, 0);
    a.jump(JEQ_K, R1, 0, 0, Label::L2); // no checksum: stays so
    a.csum_adjust(off::UDP_CSUM);
    a.jump(JNE_K, R1, 0, 0, Label::UdpStore);
    a.i(MOV64_K, R1, 0, 0, 0xffff);
    a.label(Label::UdpStore);
    a.i(STX_H, R7, R1, off::UDP_CSUM, 0);
    a.label(Label::L2);
    a.i(LDX_W, R1, R9, 24, 0);
    a.i(STX_W, R7, R1, 0, 0);
    a.i(LDX_H, R1, R9, 28, 0);
    a.i(STX_H, R7, R1, 4, 0);
    a.i(LDX_H, R1, R9, 30, 0);
    a.i(STX_H, R7, R1, 6, 0);
    a.i(LDX_W, R1, R9, 32, 0);
    a.i(STX_W, R7, R1, 8, 0);
    // Counters.
    a.i(MOV64_K, R1, 0, 0, 1);
    a.i(ATOMIC_DW, R9, R1, 40, 0);
    a.i(LDX_H, R1, R7, off::TOTAL_LEN, 0);
    a.i(TO_BE, R1, 0, 0, 16);
    a.i(ATOMIC_DW, R9, R1, 48, 0);
    a.i(CALL, 0, 0, 0, FN_KTIME_GET_NS);
    a.i(STX_DW, R9, R0, 56, 0);
    a.i(LDX_W, R1, R9, 20, 0);
    a.i(MOV64_K, R2, 0, 0, 0);
    a.i(CALL, 0, 0, 0, FN_REDIRECT);
    a.i(EXIT, 0, 0, 0, 0);
    a.label(Label::Miss);
    a.i(MOV64_X, R1, R6, 0, 0);
    let mut p = a.finish();
    p.extend(redirect_program(xsk_map));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_pinned() {
        use std::mem::offset_of;
        assert_eq!(size_of::<FlowKey>(), KEY_SIZE);
        assert_eq!(offset_of!(FlowKey, src), 4);
        assert_eq!(offset_of!(FlowKey, dst), 8);
        assert_eq!(offset_of!(FlowKey, sport), 12);
        assert_eq!(offset_of!(FlowKey, proto), 16);
        assert_eq!(size_of::<FlowEntry>(), ENTRY_SIZE);
        assert_eq!(offset_of!(FlowEntry, new_sport), 8);
        assert_eq!(offset_of!(FlowEntry, ip_delta), 12);
        assert_eq!(offset_of!(FlowEntry, l4_delta), 16);
        assert_eq!(offset_of!(FlowEntry, out_ifindex), 20);
        assert_eq!(offset_of!(FlowEntry, dst_mac), 24);
        assert_eq!(offset_of!(FlowEntry, src_mac), 30);
        assert_eq!(offset_of!(FlowEntry, packets), 40);
        assert_eq!(offset_of!(FlowEntry, bytes), 48);
        assert_eq!(offset_of!(FlowEntry, last_seen_ns), 56);
    }

    #[test]
    fn entry_bytes_round_trip() {
        let e = FlowEntry {
            new_src: [1, 2, 3, 4],
            new_dst: [5, 6, 7, 8],
            new_sport: [9, 10],
            new_dport: [11, 12],
            ip_delta: 0x1234,
            l4_delta: 0xfffe,
            out_ifindex: 7,
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            flags: 0,
            packets: 3,
            bytes: 300,
            last_seen_ns: 99,
        };
        assert_eq!(FlowEntry::from_bytes(&e.to_bytes()), e);
    }

    /// The full checksum of `words` (network order bytes), as a receiver computes it.
    fn full(bytes: &[u8]) -> u16 {
        let s = bytes.chunks(2).fold(0u32, |s, c| {
            fold(s + u32::from(u16::from_be_bytes([c[0], c[1]])))
        });
        !u16::try_from(fold(s)).unwrap_or(0)
    }

    #[test]
    fn delta_adjustment_equals_recomputation() {
        // An IPv4 header whose addresses change and TTL drops by one.
        let mut h = [
            0x45u8, 0, 0, 46, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 2, 192, 0, 2, 2,
        ];
        let c = full(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let delta = csum_add(
            csum_delta(&h[12..20], &[192, 0, 2, 1, 198, 51, 100, 7]),
            ttl_decrement_delta(),
        );
        let old = u16::from_ne_bytes([h[10], h[11]]);
        let new = adjust(old, delta);
        h[12..20].copy_from_slice(&[192, 0, 2, 1, 198, 51, 100, 7]);
        h[8] = 63;
        h[10..12].copy_from_slice(&new.to_ne_bytes());
        let mut check = h;
        check[10..12].fill(0);
        assert_eq!(h[10..12], full(&check).to_be_bytes());
    }

    #[test]
    fn jumps_resolve_inside_the_program() {
        let p = flow_program(3, 4);
        for (at, i) in p.iter().enumerate() {
            let class = i.code & 0x07;
            if (class == 0x05 || class == 0x06) && i.code != CALL && i.code != EXIT {
                let to = isize::try_from(at).expect("at") + 1 + isize::from(i.off);
                assert!(to > isize::try_from(at).expect("at"), "forward jumps only");
                assert!(
                    to < isize::try_from(p.len()).expect("len"),
                    "jump at {at} lands outside"
                );
            }
        }
        let maps: Vec<i32> = p
            .iter()
            .filter(|i| i.code == LD_IMM64)
            .map(|i| i.imm)
            .collect();
        assert_eq!(maps, vec![3, 4]);
    }
}
