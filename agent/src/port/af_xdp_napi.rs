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

use std::fmt::Debug;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, ErrorContext, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, NlasIterator, Parseable, ParseableParametrized,
    emit_u32, emit_u64, parse_u32, parse_u64,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink};

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
        let ask = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
        });
        let mut id = None;
        self.request(ask, NLM_F_ACK, |answer: GenlCtrl| {
            for a in answer.nlas {
                if let GenlCtrlAttrs::FamilyId(v) = a {
                    id = Some(v);
                }
            }
        })?;
        id.ok_or_else(|| io::Error::other(format!("no id for generic netlink family {name}")))
    }

    /// The NAPIs of interface `ifindex` (`napi-get` dump) and their settings.
    fn napis(&mut self, family: u16, ifindex: u32) -> io::Result<Vec<NapiSettings>> {
        let ask = NetdevNapi::message(
            family,
            NETDEV_CMD_NAPI_GET,
            vec![NapiAttr::Ifindex(ifindex)],
        );
        let mut out = Vec::new();
        self.request(ask, NLM_F_DUMP, |answer: NetdevNapi| {
            if let Some(s) = answer.settings() {
                out.push(s);
            }
        })?;
        Ok(out)
    }

    fn napi_set(&mut self, family: u16, s: &NapiSettings) -> io::Result<()> {
        let ask = NetdevNapi::message(
            family,
            NETDEV_CMD_NAPI_SET,
            vec![
                NapiAttr::Id(s.id),
                NapiAttr::DeferHardIrqs(s.defer_hard_irqs),
                NapiAttr::GroFlushTimeout(s.gro_flush_timeout_ns),
            ],
        );
        self.request(ask, NLM_F_ACK, |_: NetdevNapi| {})
    }

    /// Sends one request and hands the payload of every answer to `each`, until the
    /// acknowledgement (`flags` with `NLM_F_ACK`) or the end of the dump.
    fn request<F>(
        &mut self,
        ask: GenlMessage<F>,
        flags: u16,
        mut each: impl FnMut(F),
    ) -> io::Result<()>
    where
        F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let msg = encode(ask, NLM_F_REQUEST | flags, self.seq);
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
            let mut data = self.buf.get(..n).unwrap_or_default();
            while !data.is_empty() {
                let m = NetlinkMessage::<GenlMessage<F>>::deserialize(data).map_err(invalid)?;
                let len = usize::try_from(m.header.length).unwrap_or(usize::MAX);
                data = data
                    .get(len.next_multiple_of(4).max(1)..)
                    .unwrap_or_default();
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => {
                                Err(io::Error::from_raw_os_error(code.get().saturating_neg()))
                            }
                        };
                    }
                    NetlinkPayload::InnerMessage(g) => each(g.payload),
                    // `Noop`, `Overrun` and whatever later versions add: nothing to do.
                    _ => {}
                }
            }
        }
    }
}

/// One request, serialised: `ask` with `flags` and sequence number `seq`.
fn encode<F>(ask: GenlMessage<F>, flags: u16, seq: u32) -> Vec<u8>
where
    F: GenlFamily + Emitable + Debug,
{
    let mut m = NetlinkMessage::from(ask);
    m.header.flags = flags;
    m.header.sequence_number = seq;
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// An answer the netlink crates could not decode.
fn invalid(e: DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink answer: {e}"))
}

/// A message of the `netdev` family's NAPI commands (`napi-get`, `napi-set`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetdevNapi {
    cmd: u8,
    attrs: Vec<NapiAttr>,
}

impl NetdevNapi {
    /// Command `cmd` with `attrs`, addressed to the family's resolved id.
    fn message(family: u16, cmd: u8, attrs: Vec<NapiAttr>) -> GenlMessage<Self> {
        let mut m = GenlMessage::from_payload(Self { cmd, attrs });
        m.set_resolved_family_id(family);
        m
    }

    /// The settings in one `napi-get` answer; `None` without an id.
    fn settings(&self) -> Option<NapiSettings> {
        let mut s = NapiSettings {
            id: 0,
            defer_hard_irqs: 0,
            gro_flush_timeout_ns: 0,
        };
        let mut id = None;
        for a in &self.attrs {
            match *a {
                NapiAttr::Id(v) => id = Some(v),
                NapiAttr::DeferHardIrqs(v) => s.defer_hard_irqs = v,
                NapiAttr::GroFlushTimeout(v) => s.gro_flush_timeout_ns = v,
                NapiAttr::Ifindex(_) | NapiAttr::Other(_) => {}
            }
        }
        s.id = id?;
        Some(s)
    }
}

impl GenlFamily for NetdevNapi {
    fn family_name() -> &'static str {
        "netdev"
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevNapi {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevNapi {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| NapiAttr::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()
            .context("netdev napi attributes")?;
        Ok(Self {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// The `netdev` family's NAPI attributes this module reads or writes; the others are
/// kept as they came.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NapiAttr {
    Ifindex(u32),
    Id(u32),
    DeferHardIrqs(u32),
    /// ns; a netlink `uint`: sent as 8 bytes, read as 4 or 8.
    GroFlushTimeout(u64),
    Other(DefaultNla),
}

impl Nla for NapiAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Ifindex(_) | Self::Id(_) | Self::DeferHardIrqs(_) => 4,
            Self::GroFlushTimeout(_) => 8,
            Self::Other(a) => a.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Ifindex(_) => NETDEV_A_NAPI_IFINDEX,
            Self::Id(_) => NETDEV_A_NAPI_ID,
            Self::DeferHardIrqs(_) => NETDEV_A_NAPI_DEFER_HARD_IRQS,
            Self::GroFlushTimeout(_) => NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT,
            Self::Other(a) => a.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // `buffer` is exactly `value_len` long (the crate's `Nla::emit` sizes it), so
        // these writes cannot fail.
        let _ = match *self {
            Self::Ifindex(v) | Self::Id(v) | Self::DeferHardIrqs(v) => emit_u32(buffer, v),
            Self::GroFlushTimeout(v) => emit_u64(buffer, v),
            Self::Other(ref a) => {
                a.emit_value(buffer);
                Ok(())
            }
        };
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for NapiAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            NETDEV_A_NAPI_IFINDEX => Self::Ifindex(parse_u32(v).context("napi ifindex")?),
            NETDEV_A_NAPI_ID => Self::Id(parse_u32(v).context("napi id")?),
            NETDEV_A_NAPI_DEFER_HARD_IRQS => {
                Self::DeferHardIrqs(parse_u32(v).context("napi defer-hard-irqs")?)
            }
            NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT => Self::GroFlushTimeout(if v.len() == 4 {
                u64::from(parse_u32(v).context("napi gro-flush-timeout")?)
            } else {
                parse_u64(v).context("napi gro-flush-timeout")?
            }),
            _ => Self::Other(DefaultNla::parse(buf).context("napi attribute")?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attribute `ty` with `value`, padded to 4 bytes, as the kernel writes them.
    fn put_attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
        let len = u16::try_from(4 + value.len()).expect("small");
        buf.extend_from_slice(&len.to_ne_bytes());
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(value);
        buf.resize(buf.len().next_multiple_of(4), 0);
    }

    fn header(cmd: u8) -> GenlHeader {
        GenlHeader { cmd, version: 1 }
    }

    #[test]
    fn a_request_is_laid_out_as_the_kernel_reads_it() {
        let ask = NetdevNapi::message(
            0x20,
            NETDEV_CMD_NAPI_SET,
            vec![
                NapiAttr::Id(7),
                NapiAttr::DeferHardIrqs(2),
                NapiAttr::GroFlushTimeout(5 << 33),
            ],
        );
        let m = encode(ask, NLM_F_REQUEST | NLM_F_ACK, 9);
        assert_eq!(m.len(), 16 + 4 + 8 + 8 + 12);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().expect("4")), 48);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x20, "family id");
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 5, "REQUEST | ACK");
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().expect("4")), 9);
        assert_eq!(&m[16..20], &[NETDEV_CMD_NAPI_SET, 1, 0, 0]);
        let mut attrs = Vec::new();
        put_attr(&mut attrs, NETDEV_A_NAPI_ID, &7u32.to_ne_bytes());
        put_attr(
            &mut attrs,
            NETDEV_A_NAPI_DEFER_HARD_IRQS,
            &2u32.to_ne_bytes(),
        );
        put_attr(
            &mut attrs,
            NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT,
            &(5u64 << 33).to_ne_bytes(),
        );
        assert_eq!(&m[20..], &attrs[..]);
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
        // An attribute this module does not know (the NAPI's IRQ) is kept, not an error.
        put_attr(&mut a, 3, &42u32.to_ne_bytes());
        let got = NetdevNapi::parse_with_param(&a, header(NETDEV_CMD_NAPI_GET)).expect("parses");
        assert_eq!(
            got.settings(),
            Some(NapiSettings {
                id: 8193,
                defer_hard_irqs: 2,
                gro_flush_timeout_ns: 20_000
            })
        );
        let mut b = Vec::new();
        put_attr(
            &mut b,
            NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT,
            &(5u64 << 33).to_ne_bytes(),
        );
        put_attr(&mut b, NETDEV_A_NAPI_ID, &1u32.to_ne_bytes());
        let got = NetdevNapi::parse_with_param(&b, header(NETDEV_CMD_NAPI_GET)).expect("parses");
        assert_eq!(
            got.settings().map(|s| s.gro_flush_timeout_ns),
            Some(5 << 33)
        );
        // No id: not a NAPI.
        let mut c = Vec::new();
        put_attr(&mut c, NETDEV_A_NAPI_DEFER_HARD_IRQS, &2u32.to_ne_bytes());
        let got = NetdevNapi::parse_with_param(&c, header(NETDEV_CMD_NAPI_GET)).expect("parses");
        assert_eq!(got.settings(), None);
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let mut a = Vec::new();
        put_attr(&mut a, NETDEV_A_NAPI_ID, &1u32.to_ne_bytes());
        // An attribute header that claims more than there is.
        let mut long = a.clone();
        long.extend_from_slice(&[64, 0, 2, 0, 1]);
        assert!(NetdevNapi::parse_with_param(&long, header(NETDEV_CMD_NAPI_GET)).is_err());
        // An id of the wrong width.
        let mut short = Vec::new();
        put_attr(&mut short, NETDEV_A_NAPI_ID, &[1, 0]);
        assert!(NetdevNapi::parse_with_param(&short, header(NETDEV_CMD_NAPI_GET)).is_err());
        // Whole messages cut anywhere.
        let m = encode(
            NetdevNapi::message(0x20, NETDEV_CMD_NAPI_GET, vec![NapiAttr::Id(1)]),
            NLM_F_REQUEST,
            1,
        );
        assert!(NetlinkMessage::<GenlMessage<NetdevNapi>>::deserialize(&m).is_ok());
        for cut in 0..m.len() {
            assert!(
                NetlinkMessage::<GenlMessage<NetdevNapi>>::deserialize(&m[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn the_controller_resolves_the_netdev_family() {
        let mut nl = Genl::open().expect("a netlink socket");
        match nl.family_id("netdev") {
            Ok(id) => assert!(id > 0x10, "{id}"),
            // A kernel without the family (before 6.5) answers ENOENT.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        }
        let e = nl.family_id("ctoff-nofamily").expect_err("no such family");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
}
