//! A Linux network interface as a port, through an `AF_PACKET`/`SOCK_RAW` socket.
//!
//! The socket is bound to one interface, non-blocking, promiscuous
//! (`PACKET_ADD_MEMBERSHIP`/`PACKET_MR_PROMISC`), and ignores its own transmissions
//! (`PACKET_IGNORE_OUTGOING`), so the device never receives what it sent. Packet I/O is
//! one of ([`AfPacketIo`]):
//!
//! - `recvmmsg`/`sendmmsg` ([`AfPacketPort::open`]): frames are received and sent in
//!   chunks, straight into and out of the caller's [`FrameBatch`]. The kernel strips a
//!   VLAN tag into packet metadata before handing a frame to packet sockets; it comes
//!   back through `PACKET_AUXDATA` and is put back into the frame, so the device sees
//!   the frame as it was on the wire.
//! - memory-mapped rings ([`AfPacketPort::open_with`] and a [`RingConfig`]): a
//!   `TPACKET_V3` receive ring (the VLAN tag comes from the frame header) and a
//!   transmit ring with one `send()` per batch, or `sendmmsg` when the configuration
//!   asks for no transmit ring (see [`super::tpacket`]).
//!
//! `PACKET_QDISC_BYPASS` ([`AfPacketConfig::qdisc_bypass`]) hands sent frames straight
//! to the driver, skipping the interface's queueing discipline.
//!
//! The `unsafe` here is system calls only (this is the crate's I/O layer): each block
//! passes pointers to live, correctly sized buffers for the duration of one call. The
//! ring memory is touched only in `tpacket::map`.

use std::ffi::CString;
use std::fmt;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;

use super::tpacket::{self, RingConfig, Rings};
use super::{FRAME_BUF_SIZE, FrameBatch, PortBackend, PortStats};
use crate::error::{Error, Result};

/// Frames per `recvmmsg`/`sendmmsg` call.
const CHUNK: usize = 32;
/// Length of an 802.1Q tag.
pub(crate) const VLAN_TAG_LEN: usize = 4;
/// Offset of the EtherType (or TPID) in an Ethernet frame.
pub(crate) const ETHERTYPE_OFFSET: usize = 12;
/// Control buffer per message, in `u64`s (aligned for `cmsghdr`); room for one
/// `tpacket_auxdata` message.
const CTRL_WORDS: usize = 8;
/// The 802.1Q TPID, used when the kernel does not report one.
pub(crate) const TPID_8021Q: u16 = 0x8100;

/// How an [`AfPacketPort`] is opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AfPacketConfig {
    /// Memory-mapped rings; `None`: `recvmmsg`/`sendmmsg`.
    pub ring: Option<RingConfig>,
    /// Set `PACKET_QDISC_BYPASS`: sent frames skip the interface's qdisc (no traffic
    /// control, no qdisc drops or requeues; the driver's queue is the only one).
    pub qdisc_bypass: bool,
}

impl AfPacketConfig {
    /// Memory-mapped rings with the default [`RingConfig`] (receive and transmit).
    pub fn rings() -> Self {
        Self {
            ring: Some(RingConfig::default()),
            qdisc_bypass: false,
        }
    }
}

/// Which packet I/O an [`AfPacketPort`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfPacketIo {
    /// `recvmmsg` and `sendmmsg`.
    Mmsg,
    /// A `TPACKET_V3` receive ring; `sendmmsg`.
    RxRing,
    /// A `TPACKET_V3` receive ring and a transmit ring.
    Rings,
}

impl fmt::Display for AfPacketIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mmsg => "recvmmsg/sendmmsg",
            Self::RxRing => "TPACKET_V3 RX ring + sendmmsg",
            Self::Rings => "TPACKET_V3 RX ring + TX ring",
        })
    }
}

/// A port on a Linux interface.
#[derive(Debug)]
pub struct AfPacketPort {
    /// The rings, when the port uses them (dropped before `fd`: unmapped first).
    rings: Option<Rings>,
    fd: OwnedFd,
    ifindex: u32,
    stats: PortStats,
}

fn c_u16(v: libc::c_int) -> u16 {
    u16::try_from(v).unwrap_or(0)
}

/// `setsockopt(fd, level, name, value)`; `op` names it in the error.
pub(crate) fn setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
    op: &'static str,
) -> Result<()> {
    let len = libc::socklen_t::try_from(mem::size_of::<T>()).unwrap_or(0);
    // SAFETY: `value` points to a live `T` of `len` bytes for the whole call; the kernel
    // only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            ptr::from_ref(value).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(Error::last_os(op));
    }
    Ok(())
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR)
    ) || e.kind() == std::io::ErrorKind::WouldBlock
}

impl AfPacketPort {
    /// Opens a port on the interface called `ifname`, with `recvmmsg`/`sendmmsg`.
    pub fn open(ifname: &str) -> Result<Self> {
        Self::open_with(ifname, &AfPacketConfig::default())
    }

    /// Opens a port on the interface called `ifname`, configured by `cfg`. Fails when
    /// the requested rings cannot be set up (the caller may fall back to less).
    pub fn open_with(ifname: &str, cfg: &AfPacketConfig) -> Result<Self> {
        let no_such = || Error::NoSuchInterface {
            name: ifname.to_owned(),
        };
        let cname = CString::new(ifname).map_err(|_| no_such())?;
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(no_such());
        }
        Self::open_ifindex_with(ifindex, cfg)
    }

    /// Opens a port on the interface with index `ifindex`, with `recvmmsg`/`sendmmsg`.
    pub fn open_ifindex(ifindex: u32) -> Result<Self> {
        Self::open_ifindex_with(ifindex, &AfPacketConfig::default())
    }

    /// Opens a port on the interface with index `ifindex`, configured by `cfg`.
    pub fn open_ifindex_with(ifindex: u32, cfg: &AfPacketConfig) -> Result<Self> {
        // Protocol 0: the socket receives nothing until it is bound to one interface
        // below, so no frame of another interface can slip in.
        // SAFETY: socket takes integer arguments only.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(Error::last_os("open AF_PACKET socket"));
        }
        // SAFETY: socket returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        setsockopt(
            &fd,
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            &one,
            "set PACKET_IGNORE_OUTGOING",
        )?;
        if cfg.qdisc_bypass {
            setsockopt(
                &fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one,
                "set PACKET_QDISC_BYPASS",
            )?;
        }
        // The rings are set up before the socket is bound: no frame reaches it before
        // it has them.
        let rings = match &cfg.ring {
            Some(ring) => Some(tpacket::setup(&fd, ring)?),
            None => {
                setsockopt(
                    &fd,
                    libc::SOL_PACKET,
                    libc::PACKET_AUXDATA,
                    &one,
                    "set PACKET_AUXDATA",
                )?;
                None
            }
        };
        let c_ifindex = libc::c_int::try_from(ifindex).map_err(|_| Error::NoSuchInterface {
            name: format!("#{ifindex}"),
        })?;
        let addr = libc::sockaddr_ll {
            sll_family: c_u16(libc::AF_PACKET),
            sll_protocol: c_u16(libc::ETH_P_ALL).to_be(),
            sll_ifindex: c_ifindex,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        let addr_len = libc::socklen_t::try_from(mem::size_of_val(&addr)).unwrap_or(0);
        // SAFETY: `addr` is a live, initialised sockaddr_ll of `addr_len` bytes; the
        // kernel only reads it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                addr_len,
            )
        };
        if rc < 0 {
            return Err(Error::last_os("bind AF_PACKET socket"));
        }
        let mreq = libc::packet_mreq {
            mr_ifindex: c_ifindex,
            mr_type: c_u16(libc::PACKET_MR_PROMISC),
            mr_alen: 0,
            mr_address: [0; 8],
        };
        setsockopt(
            &fd,
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &mreq,
            "enable promiscuous mode",
        )?;
        Ok(Self {
            rings,
            fd,
            ifindex,
            stats: PortStats::default(),
        })
    }

    /// The interface index the port is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The packet I/O the port uses.
    pub fn io(&self) -> AfPacketIo {
        match &self.rings {
            None => AfPacketIo::Mmsg,
            Some(Rings { tx: None, .. }) => AfPacketIo::RxRing,
            Some(Rings { tx: Some(_), .. }) => AfPacketIo::Rings,
        }
    }

    /// Adds the frames the kernel dropped for want of a free ring block (reported by
    /// `PACKET_STATISTICS`, which resets as it is read) to `rx_dropped`.
    fn collect_ring_drops(&mut self) {
        // SAFETY: all-zero bytes are a valid `tpacket_stats_v3` (plain integers).
        let mut st: libc::tpacket_stats_v3 = unsafe { mem::zeroed() };
        let mut len = libc::socklen_t::try_from(mem::size_of_val(&st)).unwrap_or(0);
        // SAFETY: `st` is a live, writable buffer of `len` bytes for the whole call; the
        // kernel writes at most `len` bytes and stores the length it wrote in `len`.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                ptr::from_mut(&mut st).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            self.stats.rx_dropped += u64::from(st.tp_drops);
        }
    }

    /// One `recvmmsg` of up to `want` (at most `CHUNK`) frames into `batch`'s spare
    /// buffers. Returns (frames taken, messages the kernel returned).
    fn recv_chunk(&mut self, batch: &mut FrameBatch, want: usize) -> Result<(usize, usize)> {
        let (bufs, lens) = batch.spare_mut();
        let want = want.min(CHUNK).min(bufs.len());
        if want == 0 {
            return Ok((0, 0));
        }
        let mut iov = [libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        }; CHUNK];
        let mut ctrl = [[0u64; CTRL_WORDS]; CHUNK];
        // SAFETY: `mmsghdr` is plain data for which all-zero bytes are valid (null
        // pointers, zero lengths and flags).
        let mut msgs: [libc::mmsghdr; CHUNK] = unsafe { mem::zeroed() };
        for (((buf, v), c), m) in bufs
            .iter_mut()
            .zip(iov.iter_mut())
            .zip(ctrl.iter_mut())
            .zip(msgs.iter_mut())
            .take(want)
        {
            *v = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: FRAME_BUF_SIZE,
            };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = c.as_mut_ptr().cast();
            // `size_t` on glibc, `socklen_t` on musl.
            #[allow(clippy::useless_conversion)]
            let ctrl_len = mem::size_of_val(c).try_into().unwrap_or(0);
            m.msg_hdr.msg_controllen = ctrl_len;
        }
        let vlen = libc::c_uint::try_from(want).unwrap_or(0);
        // SAFETY: the first `want` entries of `msgs` each point to one iovec of
        // FRAME_BUF_SIZE bytes inside a distinct buffer of `bufs` and to a control
        // buffer of the stated length; all of them live until the call returns, and
        // nothing else accesses them meanwhile. A null timeout is allowed.
        let rc = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                ptr::null_mut(),
            )
        };
        let Ok(got) = usize::try_from(rc) else {
            let e = std::io::Error::last_os_error();
            if would_block(&e) {
                return Ok((0, 0));
            }
            return Err(Error::io("recvmmsg", e));
        };
        let mut taken = 0;
        for (i, m) in msgs.iter().enumerate().take(got) {
            let len = usize::try_from(m.msg_len).unwrap_or(usize::MAX);
            let vlan = aux_vlan(&m.msg_hdr);
            let full_len = len.saturating_add(if vlan.is_some() { VLAN_TAG_LEN } else { 0 });
            let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            if truncated || full_len > FRAME_BUF_SIZE || len < ETHERTYPE_OFFSET {
                self.stats.rx_dropped += 1;
                continue;
            }
            if i != taken {
                bufs.copy_within(i..=i, taken);
            }
            if let Some((tpid, tci)) = vlan {
                insert_vlan_tag(&mut bufs[taken], len, tpid, tci);
            }
            lens[taken] = full_len;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += u64::try_from(full_len).unwrap_or(0);
            taken += 1;
        }
        batch.commit(taken);
        Ok((taken, got))
    }

    /// Sends `frames` through the transmit ring if there is one, else with `sendmmsg`.
    fn send_any<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]> + Clone) -> Result<()> {
        if let Some(Rings {
            map, tx: Some(tx), ..
        }) = &mut self.rings
        {
            return tx.send(map, self.fd.as_fd(), frames, &mut self.stats);
        }
        self.send_frames(frames)
    }

    /// Sends `frames` with as few `sendmmsg` calls as possible.
    fn send_frames<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]> + Clone) -> Result<()> {
        let mut rest = frames;
        loop {
            let mut iov = [libc::iovec {
                iov_base: ptr::null_mut(),
                iov_len: 0,
            }; CHUNK];
            // SAFETY: all-zero bytes are a valid `mmsghdr` (see `recv_chunk`).
            let mut msgs: [libc::mmsghdr; CHUNK] = unsafe { mem::zeroed() };
            let mut n = 0;
            for ((frame, v), m) in rest.clone().zip(iov.iter_mut()).zip(msgs.iter_mut()) {
                // The kernel never writes through a send iovec; `cast_mut` only satisfies
                // the shared iovec type.
                *v = libc::iovec {
                    iov_base: frame.as_ptr().cast_mut().cast(),
                    iov_len: frame.len(),
                };
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                n += 1;
            }
            if n == 0 {
                return Ok(());
            }
            let vlen = libc::c_uint::try_from(n).unwrap_or(0);
            // SAFETY: the first `n` entries of `msgs` each point to one iovec describing a
            // live frame slice of the stated length; everything lives until the call
            // returns. The kernel only reads the frames and writes `msg_len`.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    vlen,
                    libc::MSG_DONTWAIT,
                )
            };
            let skip = match usize::try_from(rc) {
                Ok(sent) => {
                    for frame in rest.clone().take(sent) {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += u64::try_from(frame.len()).unwrap_or(0);
                    }
                    sent
                }
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        0
                    } else if would_block(&e) {
                        // Socket buffer full: this frame is lost, as on a congested wire.
                        self.stats.tx_dropped += 1;
                        1
                    } else {
                        return Err(Error::io("sendmmsg", e));
                    }
                }
            };
            for _ in 0..skip {
                rest.next();
            }
        }
    }
}

/// Puts the 802.1Q tag `(tpid, tci)` back after the MAC addresses of the `len`-byte
/// frame in `buf`, which must have room for `len + VLAN_TAG_LEN` bytes and
/// `len >= ETHERTYPE_OFFSET` (the callers check both).
pub(crate) fn insert_vlan_tag(buf: &mut [u8; FRAME_BUF_SIZE], len: usize, tpid: u16, tci: u16) {
    buf.copy_within(ETHERTYPE_OFFSET..len, ETHERTYPE_OFFSET + VLAN_TAG_LEN);
    buf[ETHERTYPE_OFFSET..ETHERTYPE_OFFSET + 2].copy_from_slice(&tpid.to_be_bytes());
    buf[ETHERTYPE_OFFSET + 2..ETHERTYPE_OFFSET + VLAN_TAG_LEN].copy_from_slice(&tci.to_be_bytes());
}

/// The VLAN tag the kernel moved out of the frame, from the `PACKET_AUXDATA` control
/// message: `(tpid, tci)`.
fn aux_vlan(hdr: &libc::msghdr) -> Option<(u16, u16)> {
    // SAFETY: `hdr` is a msghdr filled in by recvmmsg, whose control pointer and length
    // describe a live buffer of ours (or are null/zero); CMSG_FIRSTHDR only reads them.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !c.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a pointer to a whole
        // cmsghdr inside the control buffer; read_unaligned needs no alignment.
        let cm = unsafe { ptr::read_unaligned(c) };
        let need = mem::size_of::<libc::tpacket_auxdata>();
        // SAFETY: CMSG_LEN is a pure computation.
        let min_len = unsafe { libc::CMSG_LEN(u32::try_from(need).unwrap_or(u32::MAX)) };
        if cm.cmsg_level == libc::SOL_PACKET
            && cm.cmsg_type == libc::PACKET_AUXDATA
            && u64::try_from(cm.cmsg_len).unwrap_or(0) >= u64::from(min_len)
        {
            // SAFETY: the message is at least CMSG_LEN(size_of tpacket_auxdata) long, so
            // its data holds a whole tpacket_auxdata inside the control buffer;
            // read_unaligned needs no alignment and any bytes are a valid value.
            let aux =
                unsafe { ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::tpacket_auxdata>()) };
            if aux.tp_status & libc::TP_STATUS_VLAN_VALID == 0 {
                return None;
            }
            let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                aux.tp_vlan_tpid
            } else {
                TPID_8021Q
            };
            return Some((tpid, aux.tp_vlan_tci));
        }
        // SAFETY: `c` is a valid cmsghdr of `hdr`'s control buffer (see above).
        c = unsafe { libc::CMSG_NXTHDR(hdr, c) };
    }
    None
}

impl AsFd for AfPacketPort {
    /// The socket, to wait for readability with poll/epoll.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl PortBackend for AfPacketPort {
    fn recv_batch(&mut self, batch: &mut FrameBatch, max: usize) -> Result<usize> {
        let want = max.min(batch.spare());
        if let Some(Rings { map, rx, tx }) = &mut self.rings {
            if let Some(tx) = tx {
                // Frames a refused send() left in the transmit ring go now, not with
                // the next batch, which may be long in coming.
                tx.flush(self.fd.as_fd())?;
            }
            let got = rx.recv(map, batch, want, &mut self.stats);
            if mem::take(&mut rx.losing) {
                self.collect_ring_drops();
            }
            return Ok(got);
        }
        let mut total = 0;
        while total < want {
            let ask = (want - total).min(CHUNK);
            let (taken, got) = self.recv_chunk(batch, ask)?;
            total += taken;
            if got < ask {
                break; // the socket is drained
            }
        }
        Ok(total)
    }

    fn send(&mut self, frame: &[u8]) -> Result<()> {
        if frame.len() > FRAME_BUF_SIZE {
            return Err(Error::FrameTooLong {
                len: frame.len(),
                max: FRAME_BUF_SIZE,
            });
        }
        self.send_any(std::iter::once(frame))
    }

    fn send_batch(&mut self, batch: &FrameBatch) -> Result<()> {
        self.send_any(batch.iter())
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// A veth pair with names unique to this test process, deleted on drop.
    struct Veth {
        a: String,
        b: String,
    }

    fn ip(args: &[&str]) -> std::result::Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run `ip`: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    impl Veth {
        fn create() -> std::result::Result<Self, String> {
            static N: AtomicUsize = AtomicUsize::new(0);
            let tag = format!(
                "ctv{}x{}",
                std::process::id() % 1_000_000,
                N.fetch_add(1, Ordering::Relaxed)
            );
            let (a, b) = (format!("{tag}a"), format!("{tag}b"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            let veth = Veth { a, b };
            for name in [&veth.a, &veth.b] {
                // Best effort: keeps IPv6 neighbour discovery off the link.
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
                ip(&["link", "set", name, "up"])?;
            }
            // The kernel turns the carrier on and attaches the real qdisc from its
            // link-watch work, which can lag by a second or more on a loaded machine;
            // until then frames sent into the pair are dropped. Wait for it (bounded);
            // the tests also resend, since a port may drop frames anyway.
            let deadline = Instant::now() + LINK_UP_TIMEOUT;
            while Instant::now() < deadline && !(veth.is_up(&veth.a) && veth.is_up(&veth.b)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(veth)
        }

        fn is_up(&self, name: &str) -> bool {
            std::fs::read_to_string(format!("/sys/class/net/{name}/operstate"))
                .is_ok_and(|s| s.trim() == "up")
        }
    }

    /// Generous bounds: these tests share the machine with parallel builds.
    const LINK_UP_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a frame may take to cross the pair, resends included.
    const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);
    /// Resend interval for frames that have not arrived yet.
    const RESEND_EVERY: Duration = Duration::from_millis(250);

    impl Drop for Veth {
        fn drop(&mut self) {
            // Deleting one end deletes the pair.
            let _ = ip(&["link", "del", &self.a]);
        }
    }

    fn test_frame(marker: u32, vlan: Option<u16>) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        if let Some(tci) = vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental EtherType
        f.extend_from_slice(&marker.to_be_bytes());
        f.extend_from_slice(&std::process::id().to_be_bytes());
        f.resize(64, 0xa5);
        f
    }

    /// Receives on `port` until a frame equal to `want` arrives or the time runs out.
    fn wait_for(port: &mut AfPacketPort, want: &[u8], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut batch = FrameBatch::new(16);
        while Instant::now() < deadline {
            batch.clear();
            port.recv_batch(&mut batch, 16).expect("recv");
            if batch.iter().any(|f| f == want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// Sends `frame` from `tx` every [`RESEND_EVERY`] until `rx` receives it (bounded by
    /// [`ARRIVAL_TIMEOUT`]); returns whether it arrived and how many sends it took.
    fn send_until_received(
        tx: &mut AfPacketPort,
        rx: &mut AfPacketPort,
        frame: &[u8],
    ) -> (bool, u64) {
        let deadline = Instant::now() + ARRIVAL_TIMEOUT;
        let mut sends = 0;
        while Instant::now() < deadline {
            tx.send(frame).expect("send");
            sends += 1;
            if wait_for(rx, frame, RESEND_EVERY) {
                return (true, sends);
            }
        }
        (false, sends)
    }

    fn setup() -> Option<(Veth, AfPacketPort, AfPacketPort)> {
        let veth = match Veth::create() {
            Ok(v) => v,
            Err(reason) => {
                eprintln!("skipping AF_PACKET test (needs root and iproute2): {reason}");
                return None;
            }
        };
        let a = AfPacketPort::open(&veth.a).expect("open a");
        let b = AfPacketPort::open(&veth.b).expect("open b");
        Some((veth, a, b))
    }

    #[test]
    fn frame_crosses_veth_and_is_not_seen_by_sender() {
        let Some((_veth, mut a, mut b)) = setup() else {
            return;
        };
        let frame = test_frame(1, None);
        let (arrived, sends) = send_until_received(&mut a, &mut b, &frame);
        assert!(arrived, "frame did not arrive after {sends} sends");
        assert!(
            !wait_for(&mut a, &frame, Duration::from_millis(50)),
            "sender saw its own frame"
        );
        let st = a.stats();
        assert_eq!(st.tx_frames + st.tx_dropped, sends, "{st:?}");
        assert!(st.tx_frames >= 1);
        assert!(b.stats().rx_frames >= 1);
    }

    #[test]
    fn batch_send_and_vlan_tag_survive() {
        let Some((_veth, mut a, mut b)) = setup() else {
            return;
        };
        let mut batch = FrameBatch::new(40);
        let frames: Vec<Vec<u8>> = (0..40)
            .map(|i| test_frame(100 + i, (i % 2 == 0).then_some(0x2000 | 0x123)))
            .collect();
        for f in &frames {
            batch.push(f).expect("push");
        }
        // The link is known to work once one frame crossed it.
        let (arrived, _) = send_until_received(&mut a, &mut b, &test_frame(99, None));
        assert!(arrived, "link never carried a frame");
        a.send_batch(&batch).expect("send");
        let deadline = Instant::now() + ARRIVAL_TIMEOUT;
        let mut resend_at = Instant::now() + RESEND_EVERY;
        let mut seen = vec![false; frames.len()];
        let mut rx = FrameBatch::new(64);
        while Instant::now() < deadline && !seen.iter().all(|&s| s) {
            if Instant::now() >= resend_at {
                // Frames dropped on the way (socket buffers under load) go again.
                for (f, _) in frames.iter().zip(&seen).filter(|(_, s)| !**s) {
                    a.send(f).expect("resend");
                }
                resend_at = Instant::now() + RESEND_EVERY;
            }
            rx.clear();
            b.recv_batch(&mut rx, 64).expect("recv");
            for f in rx.iter() {
                if let Some(i) = frames.iter().position(|x| x == f) {
                    seen[i] = true;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(seen.iter().all(|&s| s), "missing frames: {seen:?}");
    }

    #[test]
    fn unknown_interface_is_an_error() {
        assert!(matches!(
            AfPacketPort::open("ctoffload-nope"),
            Err(Error::NoSuchInterface { .. })
        ));
    }
}
