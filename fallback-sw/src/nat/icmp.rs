//! NAT of ICMP errors (Linux `nf_nat_icmp_reply_translation`).
//!
//! An ICMP error RELATED to a translated connection quotes a packet of that
//! connection as it looked on the far side of the NAT. Both the quote and the outer
//! header are translated:
//!
//! 1. The ICMP checksum must verify, otherwise the error is dropped.
//! 2. A redirect is passed only for a connection without NAT; otherwise dropped.
//! 3. For each manip the status and direction call for (the crossed logic of
//!    [`super::rewrite::manips`]): the quoted packet is rewritten towards the tuple of
//!    the other direction with the **opposite** manip (its IP address with the inner
//!    IPv4 header checksum, its port or ICMP id; the inner TCP checksum only if the
//!    whole 20-byte header was quoted, the inner UDP checksum only if nonzero), and the
//!    outer header's address is rewritten with the manip itself (addresses only, IPv4
//!    header checksum updated incrementally).
//! 4. The ICMP checksum is computed again over the whole message.

use super::alloc::Manip;
use super::rewrite::{L4Mode, RewriteError, V4At, manip_v4, manips, v4_at};
use crate::checksum;
use crate::table::Status;
use crate::tuple::{Dir, Tuple};
use crate::wire::{self, L3, L4, ParsedPacket, icmp::msg_type};

/// Translates the ICMP error `pkt` (in `frame`), RELATED to the connection with
/// `tuples` = `[original, reply]` and `status`, matched in direction `dir` (`Original`
/// for RELATED, `Reply` for RELATED_REPLY).
///
/// # Errors
/// [`RewriteError::BadIcmpChecksum`], [`RewriteError::RedirectWithNat`],
/// [`RewriteError::BadQuote`], [`RewriteError::Ipv6Nat`], [`RewriteError::Truncated`].
pub fn translate_error(
    frame: &mut [u8],
    pkt: &ParsedPacket,
    tuples: &[Tuple; 2],
    status: Status,
    dir: Dir,
) -> Result<(), RewriteError> {
    let L4::IcmpError { icmp_type, .. } = pkt.l4 else {
        return Err(RewriteError::BadQuote(wire::ParseError::NotIcmpError));
    };
    let (src_m, dst_m) = manips(status, dir);
    let nat = status.intersects(Status::SRC_NAT | Status::DST_NAT);
    match pkt.l3 {
        L3::Ipv4 => {}
        L3::Ipv6 if !nat => return Ok(()),
        L3::Ipv6 => return Err(RewriteError::Ipv6Nat),
        L3::Other { .. } => return Err(RewriteError::NotIp),
    }
    let at = v4_at(pkt);
    let end = at.end.min(frame.len());
    let msg = frame.get(at.l4..end).unwrap_or_default();
    if msg.len() < 8 || !checksum::verifies(checksum::sum(msg)) {
        return Err(RewriteError::BadIcmpChecksum);
    }
    if icmp_type == msg_type::REDIRECT {
        let done = Status::SRC_NAT_DONE | Status::DST_NAT_DONE;
        return if nat || !status.contains(done) {
            Err(RewriteError::RedirectWithNat)
        } else {
            Ok(())
        };
    }
    if !src_m && !dst_m {
        return Ok(());
    }
    let inner = wire::parse_inner(frame, pkt).map_err(RewriteError::BadQuote)?;
    let t = &tuples[dir.opposite().index()];
    let (sa, da) = (t.src.as_v4(), t.dst.as_v4());
    let inner_at = V4At {
        l3: usize::from(inner.l3_offset),
        l4: usize::from(inner.l4_offset),
        end: usize::from(inner.l4_offset) + usize::from(inner.l4_available),
        proto: inner.protocol,
        has_l4: !matches!(inner.l4, L4::None),
    };
    // The L4 value the inner packet gets for each inner manip: ports by side, the ICMP
    // id (source slot) for either.
    let icmp = t.is_icmp();
    if dst_m {
        // Hook manip DST: inner SRC towards t, outer DST towards invert(t).
        manip_v4(frame, &inner_at, Manip::Src, sa, t.src_l4, L4Mode::Quoted)?;
        manip_v4(frame, &at, Manip::Dst, sa, 0, L4Mode::None)?;
    }
    if src_m {
        let l4 = if icmp { t.src_l4 } else { t.dst_l4 };
        manip_v4(frame, &inner_at, Manip::Dst, da, l4, L4Mode::Quoted)?;
        manip_v4(frame, &at, Manip::Src, da, 0, L4Mode::None)?;
    }
    let c_off = at.l4 + 2;
    frame[c_off..c_off + 2].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&frame[at.l4..end]);
    frame[c_off..c_off + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}
