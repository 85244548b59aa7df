//! The fallback-sw wire parser on arbitrary frames: `parse` with each set of checksum
//! options, then `parse_inner` for ICMP errors. Checks: no panic, offsets inside the
//! frame, and (differentially) a frame accepted with every checksum verified has right
//! IPv4 and L4 checksums by this crate's independent RFC 1071 routine.
#![no_main]

use ctoffload_fallback_sw::wire::{L3, L4, ParseOptions, parse, parse_inner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let opts = ParseOptions {
        verify_ipv4_checksum: sel & 1 != 0,
        verify_l4_checksum: sel & 2 != 0,
    };
    let Ok(p) = parse(frame, opts) else {
        return;
    };
    let l3 = usize::from(p.l3_offset);
    let l4 = usize::from(p.l4_offset);
    let pay = usize::from(p.payload_offset);
    assert!(l3 <= frame.len() && l4 <= frame.len() && pay <= frame.len());
    if p.is_ip() {
        assert!(l3 <= l4 && l4 <= pay, "offsets out of order: {p:?}");
        assert!(p.l3_end() <= frame.len(), "l3 end past the frame: {p:?}");
    }
    let _ = p.l4_len();
    if p.l3 == L3::Ipv4 && opts == ParseOptions::VERIFY_ALL {
        let a = ctoffload_fuzz::audit(frame);
        assert_ne!(a.ip, Some(false), "bad ipv4 checksum accepted: {p:?}");
        assert_ne!(a.l4, Some(false), "bad l4 checksum accepted: {p:?}");
    }
    if matches!(p.l4, L4::IcmpError { .. }) {
        if let Ok(inner) = parse_inner(frame, &p) {
            assert!(usize::from(inner.l3_offset) <= frame.len());
            assert!(usize::from(inner.l4_offset) <= frame.len());
            assert_eq!(inner.l3, p.l3);
        }
    } else {
        assert!(parse_inner(frame, &p).is_err());
    }
});
