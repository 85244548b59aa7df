//! NAPI deferral of an interface's receive queues, through the kernel's `netdev`
//! generic netlink family (`napi-get`, `napi-set`; Linux 6.13 and later).
//!
//! With a NAPI's `defer_hard_irqs` and `gro_flush_timeout` non-zero, a poll that found
//! work does not end with the device allowed to schedule the NAPI again (on veth: the
//! sender, on the sender's CPU): the kernel arms a timer of `gro_flush_timeout` on the
//! CPU of that poll and polls again from it, until `defer_hard_irqs` polls in a row
//! found nothing. A busy-polling socket with `SO_PREFER_BUSY_POLL` likewise keeps the
//! NAPI to itself. These are per-NAPI settings (also per device in
//! `/sys/class/net/DEV/napi_defer_hard_irqs` and `gro_flush_timeout`, but sysfs shows
//! the namespace of whoever mounted it, not the calling thread's; netlink answers in
//! the thread's own network namespace).
//!
//! [`DeferralGuard::apply`] sets them on every NAPI of an interface and puts the previous
//! values back when dropped.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink};

/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`.
const NLM_F_ACK: u16 = 4;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
const NLM_F_DUMP: u16 = 0x300;
/// `GENL_ID_CTRL`: the controller family, which resolves family names.
const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_GETFAMILY`.
const CTRL_CMD_GETFAMILY: u8 = 3;
/// `CTRL_ATTR_FAMILY_ID` (`u16`).
const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// `CTRL_ATTR_FAMILY_NAME` (string).
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// `NETDEV_CMD_NAPI_GET`.
const NETDEV_CMD_NAPI_GET: u8 = 11;
/// `NETDEV_CMD_NAPI_SET`.
const NETDEV_CMD_NAPI_SET: u8 = 14;
/// `NETDEV_A_NAPI_IFINDEX` (`u32`).
const NETDEV_A_NAPI_IFINDEX: u16 = 1;
/// `NETDEV_A_NAPI_ID` (`u32`).
const NETDEV_A_NAPI_ID: u16 = 2;
/// `NETDEV_A_NAPI_DEFER_HARD_IRQS` (`u32`).
const NETDEV_A_NAPI_DEFER_HARD_IRQS: u16 = 5;
/// `NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT` (`uint`: 4 or 8 bytes, ns).
const NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT: u16 = 6;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct genlmsghdr`.
const GENL_HDR: usize = 4;
/// How long one answer from the kernel may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The deferral settings of one NAPI instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NapiSettings {
    /// The NAPI's id.
    pub id: u32,
    /// `defer_hard_irqs`: empty polls before the device may reschedule the NAPI.
    pub defer_hard_irqs: u32,
    /// `gro_flush_timeout` in ns: the timer armed after a poll.
    pub gro_flush_timeout_ns: u64,
}

/// The NAPI instances of interface `ifindex` (in this thread's network namespace)
/// with their deferral settings.
///
/// # Errors
/// No `netdev` generic netlink family (Linux before 6.5) or the dump failed.
pub(super) fn settings(ifindex: u32) -> io::Result<Vec<NapiSettings>> {
    let mut nl = Genl::open()?;
    let family = nl.family_id("netdev")?;
    nl.napis(family, ifindex)
}

/// Deferral applied to the NAPIs of one interface; restored when dropped.
pub(super) struct DeferralGuard {
    nl: Genl,
    family: u16,
    saved: Vec<NapiSettings>,
}

impl DeferralGuard {
    /// Sets `defer_hard_irqs` and `gro_flush_timeout` on every NAPI of interface
    /// `ifindex` (in this thread's network namespace). Returns how many were set.
    ///
    /// # Errors
    /// No `netdev` family or no `napi-set` (Linux before 6.13), no NAPI on the
    /// interface (`ENOENT`), or the change refused (`CAP_NET_ADMIN`).
    pub(super) fn apply(
        ifindex: u32,
        defer_hard_irqs: u32,
        gro_flush_timeout: Duration,
    ) -> io::Result<Self> {
        let mut nl = Genl::open()?;
        let family = nl.family_id("netdev")?;
        let saved = nl.napis(family, ifindex)?;
        if saved.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no NAPI instance on interface {ifindex}"),
            ));
        }
        let timeout_ns = u64::try_from(gro_flush_timeout.as_nanos()).unwrap_or(u64::MAX);
        let mut this = Self {
            nl,
            family,
            saved: Vec::with_capacity(saved.len()),
        };
        for old in saved {
            this.nl.napi_set(
                family,
                &NapiSettings {
                    id: old.id,
                    defer_hard_irqs,
                    gro_flush_timeout_ns: timeout_ns,
                },
            )?;
            // Only what was changed is put back (on failure, by `Drop`).
            this.saved.push(old);
        }
        Ok(this)
    }

    /// The NAPIs changed, with their previous settings.
    pub(super) fn previous(&self) -> &[NapiSettings] {
        &self.saved
    }
}

impl std::fmt::Debug for DeferralGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferralGuard")
            .field("family", &self.family)
            .field("previous", &self.saved)
            .finish_non_exhaustive()
    }
}

impl Drop for DeferralGuard {
    fn drop(&mut self) {
        for old in &self.saved {
            // A NAPI that is gone (its device removed, or veth's XDP NAPI deleted with
            // the program) has nothing to restore.
            if let Err(e) = self.nl.napi_set(self.family, old) {
                tracing::debug!(napi = old.id, error = %e, "restoring NAPI deferral");
            }
        }
    }
}

/// A generic netlink socket.
struct Genl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Genl {
    fn open() -> io::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::GENERIC),
        )?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(REPLY_TIMEOUT),
        )?;
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; 32 * 1024],
        })
    }

    /// The id of generic netlink family `name`.
    fn family_id(&mut self, name: &str) -> io::Result<u16> {
        let mut attrs = Vec::new();
        let mut z = name.as_bytes().to_vec();
        z.push(0);
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, &z);
        let mut id = None;
        self.request(GENL_ID_CTRL, NLM_F_ACK, CTRL_CMD_GETFAMILY, &attrs, |a| {
            for (ty, v) in Attrs(a) {
                if ty == CTRL_ATTR_FAMILY_ID {
                    id = <[u8; 2]>::try_from(v).ok().map(u16::from_ne_bytes);
                }
            }
        })?;
        id.ok_or_else(|| io::Error::other(format!("no id for generic netlink family {name}")))
    }

    /// The NAPIs of interface `ifindex` (`napi-get` dump) and their settings.
    fn napis(&mut self, family: u16, ifindex: u32) -> io::Result<Vec<NapiSettings>> {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, NETDEV_A_NAPI_IFINDEX, &ifindex.to_ne_bytes());
        let mut out = Vec::new();
        self.request(family, NLM_F_DUMP, NETDEV_CMD_NAPI_GET, &attrs, |a| {
            if let Some(s) = parse_napi(a) {
                out.push(s);
            }
        })?;
        Ok(out)
    }

    fn napi_set(&mut self, family: u16, s: &NapiSettings) -> io::Result<()> {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, NETDEV_A_NAPI_ID, &s.id.to_ne_bytes());
        put_attr(
            &mut attrs,
            NETDEV_A_NAPI_DEFER_HARD_IRQS,
            &s.defer_hard_irqs.to_ne_bytes(),
        );
        put_attr(
            &mut attrs,
            NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT,
            &s.gro_flush_timeout_ns.to_ne_bytes(),
        );
        self.request(family, NLM_F_ACK, NETDEV_CMD_NAPI_SET, &attrs, |_| {})
    }

    /// Sends one request and hands the attributes of every answer to `each`, until the
    /// acknowledgement (`flags` with `NLM_F_ACK`) or the end of the dump.
    fn request(
        &mut self,
        family: u16,
        flags: u16,
        cmd: u8,
        attrs: &[u8],
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let msg = encode(family, NLM_F_REQUEST | flags, self.seq, cmd, attrs)?;
        let sent = rustix::net::send(&self.fd, &msg, SendFlags::empty())?;
        if sent != msg.len() {
            return Err(io::Error::other("netlink request sent in part"));
        }
        let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
        loop {
            if std::time::Instant::now() > deadline {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            // Each wait is bounded too (`SO_RCVTIMEO`).
            let (n, _) = rustix::net::recv(self.fd.as_fd(), &mut self.buf[..], RecvFlags::empty())?;
            let data = self.buf.get(..n).unwrap_or_default();
            for m in Messages(data) {
                if m.seq != self.seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = m
                            .payload
                            .get(..4)
                            .and_then(|b| <[u8; 4]>::try_from(b).ok())
                            .map_or(-libc::EPROTO, i32::from_ne_bytes);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(code.saturating_neg()))
                        };
                    }
                    _ => each(m.payload.get(GENL_HDR..).unwrap_or_default()),
                }
            }
        }
    }
}

/// One generic netlink request: header, genl header (`cmd`, version 1), attributes.
fn encode(family: u16, flags: u16, seq: u32, cmd: u8, attrs: &[u8]) -> io::Result<Vec<u8>> {
    let len = NLMSG_HDR + GENL_HDR + attrs.len();
    let len32 = u32::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&len32.to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    m.extend_from_slice(&[cmd, 1, 0, 0]);
    m.extend_from_slice(attrs);
    Ok(m)
}

/// Appends attribute `ty` with `value`, padded to 4 bytes.
fn put_attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The settings in one `napi-get` answer; `None` without an id.
fn parse_napi(attrs: &[u8]) -> Option<NapiSettings> {
    let mut s = NapiSettings {
        id: 0,
        defer_hard_irqs: 0,
        gro_flush_timeout_ns: 0,
    };
    let mut id = None;
    for (ty, v) in Attrs(attrs) {
        match ty {
            NETDEV_A_NAPI_ID => id = <[u8; 4]>::try_from(v).ok().map(u32::from_ne_bytes),
            NETDEV_A_NAPI_DEFER_HARD_IRQS => {
                s.defer_hard_irqs = <[u8; 4]>::try_from(v).map_or(0, u32::from_ne_bytes);
            }
            NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT => s.gro_flush_timeout_ns = uint(v),
            _ => {}
        }
    }
    s.id = id?;
    Some(s)
}

/// A netlink `uint` attribute: 4 or 8 bytes.
fn uint(v: &[u8]) -> u64 {
    match v.len() {
        4 => <[u8; 4]>::try_from(v).map_or(0, |b| u64::from(u32::from_ne_bytes(b))),
        _ => <[u8; 8]>::try_from(v).map_or(0, u64::from_ne_bytes),
    }
}

/// One netlink message of a datagram.
struct Message<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The messages of a datagram; stops at the first malformed header.
struct Messages<'a>(&'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        let h = self.0.get(..NLMSG_HDR)?;
        let len = usize::try_from(u32::from_ne_bytes(h[0..4].try_into().ok()?)).ok()?;
        let body = self.0.get(NLMSG_HDR..len)?;
        let m = Message {
            ty: u16::from_ne_bytes(h[4..6].try_into().ok()?),
            seq: u32::from_ne_bytes(h[8..12].try_into().ok()?),
            payload: body,
        };
        self.0 = self.0.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some(m)
    }
}

/// The attributes (type without the nested/byte-order flags, value) of a payload;
/// stops at the first malformed one.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let h = self.0.get(..4)?;
        let len = usize::from(u16::from_ne_bytes([h[0], h[1]]));
        let ty = u16::from_ne_bytes([h[2], h[3]]) & 0x3fff;
        let value = self.0.get(4..len)?;
        self.0 = self.0.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((ty, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_laid_out_as_the_kernel_reads_it() {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, NETDEV_A_NAPI_ID, &7u32.to_ne_bytes());
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, b"net\0\0"); // padded to 12
        assert_eq!(attrs.len(), 8 + 12);
        let m = encode(
            0x20,
            NLM_F_REQUEST | NLM_F_ACK,
            9,
            NETDEV_CMD_NAPI_SET,
            &attrs,
        )
        .expect("small");
        assert_eq!(m.len(), 16 + 4 + 20);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().expect("4")), 40);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x20);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 5);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().expect("4")), 9);
        assert_eq!(&m[16..20], &[NETDEV_CMD_NAPI_SET, 1, 0, 0]);
        let got: Vec<_> = Attrs(&m[20..]).collect();
        assert_eq!(got[0], (NETDEV_A_NAPI_ID, &7u32.to_ne_bytes()[..]));
        assert_eq!(got[1], (CTRL_ATTR_FAMILY_NAME, &b"net\0\0"[..]));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn napi_answers_parse_with_either_width_of_timeout() {
        let mut a = Vec::new();
        put_attr(&mut a, NETDEV_A_NAPI_IFINDEX, &3u32.to_ne_bytes());
        put_attr(&mut a, NETDEV_A_NAPI_ID, &8193u32.to_ne_bytes());
        put_attr(&mut a, NETDEV_A_NAPI_DEFER_HARD_IRQS, &2u32.to_ne_bytes());
        put_attr(
            &mut a,
            NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT,
            &20_000u32.to_ne_bytes(),
        );
        let s = parse_napi(&a).expect("has an id");
        assert_eq!(
            s,
            NapiSettings {
                id: 8193,
                defer_hard_irqs: 2,
                gro_flush_timeout_ns: 20_000
            }
        );
        let mut b = Vec::new();
        put_attr(
            &mut b,
            NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT,
            &(5u64 << 33).to_ne_bytes(),
        );
        put_attr(&mut b, NETDEV_A_NAPI_ID, &1u32.to_ne_bytes());
        assert_eq!(
            parse_napi(&b).map(|s| s.gro_flush_timeout_ns),
            Some(5 << 33)
        );
        // No id: not a NAPI.
        let mut c = Vec::new();
        put_attr(&mut c, NETDEV_A_NAPI_DEFER_HARD_IRQS, &2u32.to_ne_bytes());
        assert_eq!(parse_napi(&c), None);
    }

    #[test]
    fn truncated_input_ends_the_iteration() {
        let mut a = Vec::new();
        put_attr(&mut a, NETDEV_A_NAPI_ID, &1u32.to_ne_bytes());
        // A header that claims more than there is.
        a.extend_from_slice(&[64, 0, 2, 0, 1]);
        assert_eq!(Attrs(&a).count(), 1);
        let m = encode(0x10, 0, 1, 3, &a).expect("small");
        assert_eq!(Messages(&m).count(), 1);
        assert_eq!(Messages(&m[..m.len() - 1]).count(), 0);
        assert_eq!(Messages(&m[..10]).count(), 0);
    }

    #[test]
    fn the_controller_resolves_the_netdev_family() {
        let mut nl = Genl::open().expect("a netlink socket");
        match nl.family_id("netdev") {
            Ok(id) => assert!(id > GENL_ID_CTRL, "{id}"),
            // A kernel without the family (before 6.5) answers ENOENT.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        }
        let e = nl.family_id("ctoff-nofamily").expect_err("no such family");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
}
