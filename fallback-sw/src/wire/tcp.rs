//! TCP headers (RFC 9293) and options (RFC 7323, RFC 2018).

use super::{Layer, ParseError, be16, be32, need, put16, put32};

mod field {
    pub(super) const SRC_PORT: usize = 0;
    pub(super) const DST_PORT: usize = 2;
    pub(super) const SEQ: usize = 4;
    pub(super) const ACK: usize = 8;
    pub(super) const DOFF_FLAGS: usize = 12;
    pub(super) const WINDOW: usize = 14;
    pub(super) const CHECKSUM: usize = 16;
    pub(super) const URGENT: usize = 18;
}

/// Length of a TCP header without options.
pub const HEADER_LEN: usize = 20;

bitflags::bitflags! {
    /// TCP control bits (the low 9 bits of header bytes 12..14).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct TcpFlags: u16 {
        /// No more data from sender.
        const FIN = 0x001;
        /// Synchronize sequence numbers.
        const SYN = 0x002;
        /// Reset the connection.
        const RST = 0x004;
        /// Push function.
        const PSH = 0x008;
        /// Acknowledgment field significant.
        const ACK = 0x010;
        /// Urgent pointer field significant.
        const URG = 0x020;
        /// ECN-Echo.
        const ECE = 0x040;
        /// Congestion Window Reduced.
        const CWR = 0x080;
        /// Accurate ECN (formerly NS).
        const AE = 0x100;
    }
}

/// A view of a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors may panic on a short one.
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a segment (header and payload) after checking that the fixed header is
    /// whole and the data offset is at least 5 and within the buffer.
    ///
    /// # Errors
    /// [`ParseError::Truncated`], [`ParseError::BadTcpDataOffset`].
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let b = buffer.as_ref();
        need(Layer::Tcp, b, HEADER_LEN)?;
        let p = Self { buffer };
        let doff = p.data_offset();
        let available = p.buffer.as_ref().len();
        if doff < 5 || p.header_len() > available {
            return Err(ParseError::BadTcpDataOffset {
                data_offset: doff,
                available,
            });
        }
        Ok(p)
    }

    /// Gives the buffer back.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Source port.
    #[inline]
    #[must_use]
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// Destination port.
    #[inline]
    #[must_use]
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// Sequence number.
    #[inline]
    #[must_use]
    pub fn seq(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SEQ)
    }

    /// Acknowledgment number.
    #[inline]
    #[must_use]
    pub fn ack(&self) -> u32 {
        be32(self.buffer.as_ref(), field::ACK)
    }

    /// Data offset field (32-bit words).
    #[inline]
    #[must_use]
    pub fn data_offset(&self) -> u8 {
        self.buffer.as_ref()[field::DOFF_FLAGS] >> 4
    }

    /// Header length in bytes, options included.
    #[inline]
    #[must_use]
    pub fn header_len(&self) -> usize {
        usize::from(self.data_offset()) * 4
    }

    /// Control bits.
    #[inline]
    #[must_use]
    pub fn flags(&self) -> TcpFlags {
        TcpFlags::from_bits_truncate(be16(self.buffer.as_ref(), field::DOFF_FLAGS))
    }

    /// Window field (unscaled).
    #[inline]
    #[must_use]
    pub fn window(&self) -> u16 {
        be16(self.buffer.as_ref(), field::WINDOW)
    }

    /// Checksum field.
    #[inline]
    #[must_use]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Urgent pointer.
    #[inline]
    #[must_use]
    pub fn urgent(&self) -> u16 {
        be16(self.buffer.as_ref(), field::URGENT)
    }

    /// The option bytes.
    #[inline]
    #[must_use]
    pub fn option_bytes(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }

    /// An iterator over the options.
    #[inline]
    #[must_use]
    pub fn options(&self) -> TcpOptions<'_> {
        TcpOptions::new(self.option_bytes())
    }

    /// The payload.
    #[inline]
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source port.
    #[inline]
    pub fn set_src_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, p);
    }

    /// Sets the destination port.
    #[inline]
    pub fn set_dst_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, p);
    }

    /// Sets the sequence number.
    #[inline]
    pub fn set_seq(&mut self, v: u32) {
        put32(self.buffer.as_mut(), field::SEQ, v);
    }

    /// Sets the acknowledgment number.
    #[inline]
    pub fn set_ack(&mut self, v: u32) {
        put32(self.buffer.as_mut(), field::ACK, v);
    }

    /// Sets the data offset (words) and the control bits.
    #[inline]
    pub fn set_data_offset_flags(&mut self, data_offset: u8, flags: TcpFlags) {
        let v = (u16::from(data_offset & 0x0F) << 12) | flags.bits();
        put16(self.buffer.as_mut(), field::DOFF_FLAGS, v);
    }

    /// Sets the window.
    #[inline]
    pub fn set_window(&mut self, w: u16) {
        put16(self.buffer.as_mut(), field::WINDOW, w);
    }

    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }

    /// Sets the urgent pointer.
    #[inline]
    pub fn set_urgent(&mut self, u: u16) {
        put16(self.buffer.as_mut(), field::URGENT, u);
    }
}

/// Option kinds the parser decodes.
pub mod option_kind {
    /// End of option list.
    pub const EOL: u8 = 0;
    /// No operation (padding).
    pub const NOP: u8 = 1;
    /// Maximum segment size.
    pub const MSS: u8 = 2;
    /// Window scale.
    pub const WSCALE: u8 = 3;
    /// SACK permitted.
    pub const SACK_PERM: u8 = 4;
    /// SACK blocks.
    pub const SACK: u8 = 5;
    /// Timestamps.
    pub const TIMESTAMPS: u8 = 8;
}

/// Most SACK blocks an option can hold (40 option bytes).
pub const MAX_SACK_BLOCKS: usize = 4;

/// One decoded TCP option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOption<'a> {
    /// No operation.
    Nop,
    /// Maximum segment size.
    Mss(u16),
    /// Window scale shift (as sent; RFC 7323 caps its use at 14).
    WindowScale(u8),
    /// SACK permitted.
    SackPermitted,
    /// SACK blocks: `(left, right)` edges, the first `count` of `blocks` valid.
    Sack {
        /// The blocks.
        blocks: [(u32, u32); MAX_SACK_BLOCKS],
        /// How many blocks are valid (1 to 4).
        count: u8,
    },
    /// Timestamps.
    Timestamps {
        /// TSval.
        tsval: u32,
        /// TSecr.
        tsecr: u32,
    },
    /// Any other option: kind and data (without kind and length bytes).
    Unknown {
        /// Option kind.
        kind: u8,
        /// Option data.
        data: &'a [u8],
    },
}

/// A malformed option; the iterator stops after reporting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadTcpOption {
    /// Kind of the malformed option.
    pub kind: u8,
    /// Its offset in the option bytes.
    pub offset: usize,
}

/// Iterator over TCP options. It ends at EOL or the end of the bytes, and after yielding
/// one `Err` (a length byte missing, below 2, past the end, or wrong for a known kind).
/// It never panics.
#[derive(Debug, Clone)]
pub struct TcpOptions<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> TcpOptions<'a> {
    /// Iterates over raw option bytes.
    #[inline]
    #[must_use]
    pub const fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }
}

impl<'a> Iterator for TcpOptions<'a> {
    type Item = Result<TcpOption<'a>, BadTcpOption>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.data.get(self.pos..)?;
        let (&kind, _) = rest.split_first()?;
        let offset = self.pos;
        let bad = BadTcpOption { kind, offset };
        match kind {
            option_kind::EOL => {
                self.pos = self.data.len();
                return None;
            }
            option_kind::NOP => {
                self.pos += 1;
                return Some(Ok(TcpOption::Nop));
            }
            _ => {}
        }
        // Anything after a malformed option is unreadable: stop there.
        self.pos = self.data.len();
        let Some(&len) = rest.get(1) else {
            return Some(Err(bad));
        };
        let len = usize::from(len);
        if len < 2 || len > rest.len() {
            return Some(Err(bad));
        }
        let d = &rest[2..len];
        let opt = match (kind, d.len()) {
            (option_kind::MSS, 2) => TcpOption::Mss(be16(d, 0)),
            (option_kind::WSCALE, 1) => TcpOption::WindowScale(d[0]),
            (option_kind::SACK_PERM, 0) => TcpOption::SackPermitted,
            (option_kind::TIMESTAMPS, 8) => TcpOption::Timestamps {
                tsval: be32(d, 0),
                tsecr: be32(d, 4),
            },
            (option_kind::SACK, n) if n % 8 == 0 && (8..=8 * MAX_SACK_BLOCKS).contains(&n) => {
                let mut blocks = [(0, 0); MAX_SACK_BLOCKS];
                let mut count = 0u8;
                for (slot, b) in blocks.iter_mut().zip(d.chunks_exact(8)) {
                    *slot = (be32(b, 0), be32(b, 4));
                    count += 1;
                }
                TcpOption::Sack { blocks, count }
            }
            (
                option_kind::MSS
                | option_kind::WSCALE
                | option_kind::SACK_PERM
                | option_kind::TIMESTAMPS
                | option_kind::SACK,
                _,
            ) => return Some(Err(bad)),
            _ => TcpOption::Unknown { kind, data: d },
        };
        self.pos = offset + len;
        Some(Ok(opt))
    }
}

/// `a` is after `b` in sequence space (RFC 1982 style, never panics).
#[inline]
const fn seq_after(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 0x8000_0000
}

/// What conntrack needs from the options, gathered in one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptionSummary {
    /// MSS option.
    pub mss: Option<u16>,
    /// Window scale option, as sent.
    pub wscale: Option<u8>,
    /// SACK permitted seen.
    pub sack_permitted: bool,
    /// The highest SACK right edge (in sequence space) of any SACK block.
    pub sack_highest: Option<u32>,
    /// Timestamps `(tsval, tsecr)`.
    pub timestamps: Option<(u32, u32)>,
    /// A malformed option ended the walk; fields hold what came before it (as Linux's
    /// `tcp_options` does).
    pub malformed: bool,
}

impl OptionSummary {
    /// Walks option bytes once; the same result as folding [`TcpOptions`], decoded in
    /// place for the hot path.
    #[must_use]
    pub fn parse(options: &[u8]) -> Self {
        let mut s = Self::default();
        // The usual layout of an established-flow segment: NOP NOP TS.
        if let [1, 1, 8, 10, a, b, c, d, e, f, g, h] = *options {
            s.timestamps = Some((
                u32::from_be_bytes([a, b, c, d]),
                u32::from_be_bytes([e, f, g, h]),
            ));
            return s;
        }
        let mut pos = 0;
        while let Some(&kind) = options.get(pos) {
            match kind {
                option_kind::EOL => break,
                option_kind::NOP => {
                    pos += 1;
                    continue;
                }
                _ => {}
            }
            let Some(&len) = options.get(pos + 1) else {
                s.malformed = true;
                break;
            };
            let len = usize::from(len);
            let Some(d) = options.get(pos + 2..pos + len).filter(|_| len >= 2) else {
                s.malformed = true;
                break;
            };
            match (kind, d.len()) {
                (option_kind::MSS, 2) => s.mss = Some(be16(d, 0)),
                (option_kind::WSCALE, 1) => s.wscale = Some(d[0]),
                (option_kind::SACK_PERM, 0) => s.sack_permitted = true,
                (option_kind::TIMESTAMPS, 8) => s.timestamps = Some((be32(d, 0), be32(d, 4))),
                (option_kind::SACK, n) if n % 8 == 0 && (8..=8 * MAX_SACK_BLOCKS).contains(&n) => {
                    for b in d.chunks_exact(8) {
                        let right = be32(b, 4);
                        s.sack_highest = match s.sack_highest {
                            Some(h) if !seq_after(right, h) => Some(h),
                            _ => Some(right),
                        };
                    }
                }
                (
                    option_kind::MSS
                    | option_kind::WSCALE
                    | option_kind::SACK_PERM
                    | option_kind::TIMESTAMPS
                    | option_kind::SACK,
                    _,
                ) => {
                    s.malformed = true;
                    break;
                }
                _ => {}
            }
            pos += len;
        }
        s
    }

    /// The same summary, built from the [`TcpOptions`] iterator (the reference that
    /// [`OptionSummary::parse`] is tested against).
    #[must_use]
    pub fn from_options(options: TcpOptions<'_>) -> Self {
        let mut s = Self::default();
        for o in options {
            match o {
                Ok(TcpOption::Mss(m)) => s.mss = Some(m),
                Ok(TcpOption::WindowScale(w)) => s.wscale = Some(w),
                Ok(TcpOption::SackPermitted) => s.sack_permitted = true,
                Ok(TcpOption::Timestamps { tsval, tsecr }) => s.timestamps = Some((tsval, tsecr)),
                Ok(TcpOption::Sack { blocks, count }) => {
                    for &(_, right) in blocks.iter().take(usize::from(count)) {
                        s.sack_highest = match s.sack_highest {
                            Some(h) if !seq_after(right, h) => Some(h),
                            _ => Some(right),
                        };
                    }
                }
                Ok(TcpOption::Nop | TcpOption::Unknown { .. }) => {}
                Err(_) => s.malformed = true,
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Linux SYN: 10.0.0.1:40000 -> 10.0.0.2:80, MSS 1460, SACK-perm, TS, NOP, WS 7.
    pub(crate) const SYN: [u8; 40] = [
        0x9c, 0x40, 0x00, 0x50, // ports
        0x12, 0x34, 0x56, 0x78, // seq
        0x00, 0x00, 0x00, 0x00, // ack
        0xa0, 0x02, 0xfa, 0xf0, // doff 10, SYN, window 64240
        0x00, 0x00, 0x00, 0x00, // checksum (filled by tests that need it), urgent
        0x02, 0x04, 0x05, 0xb4, // MSS 1460
        0x04, 0x02, // SACK permitted
        0x08, 0x0a, 0x00, 0x01, 0x02, 0x03, 0x00, 0x00, 0x00, 0x00, // TS
        0x01, // NOP
        0x03, 0x03, 0x07, // WS 7
    ];

    #[test]
    fn syn_fields_and_options() {
        let p = Packet::new_checked(&SYN[..]).expect("valid");
        assert_eq!(p.src_port(), 40000);
        assert_eq!(p.dst_port(), 80);
        assert_eq!(p.seq(), 0x1234_5678);
        assert_eq!(p.ack(), 0);
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.flags(), TcpFlags::SYN);
        assert_eq!(p.window(), 64240);
        assert!(p.payload().is_empty());
        let opts: Vec<_> = p.options().collect();
        assert_eq!(
            opts,
            vec![
                Ok(TcpOption::Mss(1460)),
                Ok(TcpOption::SackPermitted),
                Ok(TcpOption::Timestamps {
                    tsval: 0x0001_0203,
                    tsecr: 0
                }),
                Ok(TcpOption::Nop),
                Ok(TcpOption::WindowScale(7)),
            ]
        );
        let s = OptionSummary::parse(p.option_bytes());
        assert_eq!(s.mss, Some(1460));
        assert_eq!(s.wscale, Some(7));
        assert!(s.sack_permitted);
        assert!(!s.malformed);
        for len in 0..SYN.len() {
            assert!(Packet::new_checked(&SYN[..len]).is_err(), "prefix {len}");
        }
    }

    #[test]
    fn bad_data_offset() {
        let mut s = SYN;
        s[12] = 0x40;
        assert_eq!(
            Packet::new_checked(&s[..]),
            Err(ParseError::BadTcpDataOffset {
                data_offset: 4,
                available: 40
            })
        );
        s[12] = 0xf0;
        assert!(matches!(
            Packet::new_checked(&s[..]),
            Err(ParseError::BadTcpDataOffset {
                data_offset: 15,
                ..
            })
        ));
    }

    #[test]
    fn sack_blocks_highest_edge_wraps() {
        let opts = [
            1, 1, 5, 26, //
            0xff, 0xff, 0xff, 0x00, 0xff, 0xff, 0xff, 0xf0, // right edge near wrap
            0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x20, // after the wrap: highest
            0xff, 0xff, 0xff, 0xf0, 0xff, 0xff, 0xff, 0xf8,
        ];
        let s = OptionSummary::parse(&opts);
        assert_eq!(s.sack_highest, Some(0x20));
        let o: Vec<_> = TcpOptions::new(&opts).collect();
        assert!(matches!(o[2], Ok(TcpOption::Sack { count: 3, .. })));
    }

    #[test]
    fn malformed_options_stop() {
        // MSS then a length of 1.
        let s = OptionSummary::parse(&[2, 4, 0x05, 0xb4, 3, 1, 7]);
        assert_eq!(s.mss, Some(1460));
        assert_eq!(s.wscale, None);
        assert!(s.malformed);
        // Length past the end.
        let v: Vec<_> = TcpOptions::new(&[1, 8, 10, 0]).collect();
        assert_eq!(
            v,
            vec![Ok(TcpOption::Nop), Err(BadTcpOption { kind: 8, offset: 1 })]
        );
        // Wrong length for a known kind.
        let v: Vec<_> = TcpOptions::new(&[2, 3, 0]).collect();
        assert_eq!(v, vec![Err(BadTcpOption { kind: 2, offset: 0 })]);
        // EOL ends; a kind byte without its length byte is malformed.
        assert_eq!(TcpOptions::new(&[0, 2, 4, 1, 1]).count(), 0);
        let v: Vec<_> = TcpOptions::new(&[1, 2]).collect();
        assert_eq!(
            v,
            vec![Ok(TcpOption::Nop), Err(BadTcpOption { kind: 2, offset: 1 })]
        );
        // Unknown options are skipped by length.
        let v: Vec<_> = TcpOptions::new(&[30, 4, 9, 9, 3, 3, 2]).collect();
        assert_eq!(
            v,
            vec![
                Ok(TcpOption::Unknown {
                    kind: 30,
                    data: &[9, 9]
                }),
                Ok(TcpOption::WindowScale(2))
            ]
        );
    }

    #[test]
    fn setters_round_trip() {
        let mut s = SYN;
        let mut p = Packet::new_checked(&mut s[..]).expect("valid");
        p.set_src_port(1);
        p.set_dst_port(2);
        p.set_seq(3);
        p.set_ack(4);
        p.set_data_offset_flags(5, TcpFlags::ACK | TcpFlags::FIN);
        p.set_window(6);
        p.set_checksum(7);
        p.set_urgent(8);
        let e = etherparse::TcpHeaderSlice::from_slice(&s).expect("etherparse");
        assert_eq!(
            (e.source_port(), e.destination_port(), e.sequence_number()),
            (1, 2, 3)
        );
        assert_eq!((e.acknowledgment_number(), e.data_offset()), (4, 5));
        assert!(e.ack() && e.fin() && !e.syn());
        assert_eq!(
            (e.window_size(), e.checksum(), e.urgent_pointer()),
            (6, 7, 8)
        );
    }

    proptest! {
        #[test]
        fn options_never_panic(data in proptest::collection::vec(any::<u8>(), 0..48)) {
            let n = TcpOptions::new(&data).count();
            prop_assert!(n <= data.len());
            prop_assert_eq!(
                OptionSummary::parse(&data),
                OptionSummary::from_options(TcpOptions::new(&data))
            );
        }

        #[test]
        fn summary_matches_iterator_on_plausible_options(
            opts in proptest::collection::vec(
                prop_oneof![
                    Just(vec![1u8]),
                    any::<u16>().prop_map(|m| { let b = m.to_be_bytes(); vec![2, 4, b[0], b[1]] }),
                    any::<u8>().prop_map(|w| vec![3, 3, w]),
                    Just(vec![4, 2]),
                    any::<[u8; 8]>().prop_map(|t| [&[8u8, 10][..], &t[..]].concat()),
                    (1usize..=4, any::<[u8; 32]>()).prop_map(|(n, b)| {
                        let len = u8::try_from(2 + 8 * n).expect("small");
                        [&[5u8, len][..], &b[..8 * n]].concat()
                    }),
                    proptest::collection::vec(any::<u8>(), 0..4),
                ],
                0..6,
            )
        ) {
            let data = opts.concat();
            prop_assert_eq!(
                OptionSummary::parse(&data),
                OptionSummary::from_options(TcpOptions::new(&data))
            );
        }
    }
}
