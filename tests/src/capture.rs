//! Receiving the raw Ethernet frames that arrive on an interface of a network
//! namespace (an AF_PACKET socket through pnet_datalink, with a read timeout), to see
//! what a kernel forwarded.

use std::time::{Duration, Instant};

use pnet_datalink::{Channel, Config, DataLinkReceiver};

use crate::netns::NetNs;

/// How long one read waits before the deadline is checked again.
const POLL: Duration = Duration::from_millis(20);

/// A raw receive socket bound to one interface.
pub struct Capture {
    interface: String,
    rx: Box<dyn DataLinkReceiver>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// A receive socket on `interface` inside `ns`. It sees frames in both directions
    /// (AF_PACKET also reports what is sent on the interface): filter by source MAC.
    ///
    /// # Errors
    /// The interface does not exist in the namespace, or the socket cannot be opened.
    pub fn open(ns: &NetNs, interface: &str) -> std::io::Result<Self> {
        let name = interface.to_owned();
        let rx = ns.run_inside(move || -> std::io::Result<_> {
            let iface = pnet_datalink::interfaces()
                .into_iter()
                .find(|i| i.name == name)
                .ok_or_else(|| std::io::Error::other(format!("no interface {name}")))?;
            let cfg = Config {
                read_timeout: Some(POLL),
                read_buffer_size: 65_536,
                ..Config::default()
            };
            match pnet_datalink::channel(&iface, cfg)? {
                Channel::Ethernet(_tx, rx) => Ok(rx),
                _ => Err(std::io::Error::other("not an Ethernet channel")),
            }
        })??;
        Ok(Self {
            interface: interface.to_owned(),
            rx,
        })
    }

    /// The first frame that `want` accepts, waiting at most `timeout`; `None` if none
    /// came. Frames it rejects are discarded.
    ///
    /// # Errors
    /// The socket failed (a read timeout is not an error).
    pub fn next_matching(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.rx.next() {
                Ok(frame) if want(frame) => return Ok(Some(frame.to_vec())),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// Discards every frame already queued (waits one poll interval).
    ///
    /// # Errors
    /// The socket failed.
    pub fn drain(&mut self) -> std::io::Result<()> {
        while self.next_matching(POLL, |_| true)?.is_some() {}
        Ok(())
    }
}
