//! Sending raw Ethernet frames out of an interface of a network namespace (an AF_PACKET
//! socket, through pnet_datalink). Frames sent out of one end of a veth pair arrive on
//! the other end as if from a wire.

use pnet_datalink::{Channel, Config, DataLinkReceiver, DataLinkSender};

use crate::netns::NetNs;

/// A raw socket bound to one interface.
pub struct Injector {
    interface: String,
    tx: Box<dyn DataLinkSender>,
    /// Kept open so the socket stays bound; never read (the kernel drops what overflows).
    _rx: Box<dyn DataLinkReceiver>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

impl Injector {
    /// A raw socket on `interface` inside `ns`.
    ///
    /// # Errors
    /// The interface does not exist in the namespace, or the socket cannot be opened.
    pub fn open(ns: &NetNs, interface: &str) -> std::io::Result<Self> {
        let name = interface.to_owned();
        let (tx, rx) = ns.run_inside(move || -> std::io::Result<_> {
            let iface = pnet_datalink::interfaces()
                .into_iter()
                .find(|i| i.name == name)
                .ok_or_else(|| std::io::Error::other(format!("no interface {name}")))?;
            let cfg = Config {
                read_buffer_size: 4096,
                ..Config::default()
            };
            match pnet_datalink::channel(&iface, cfg)? {
                Channel::Ethernet(tx, rx) => Ok((tx, rx)),
                _ => Err(std::io::Error::other("not an Ethernet channel")),
            }
        })??;
        Ok(Self {
            interface: interface.to_owned(),
            tx,
            _rx: rx,
        })
    }

    /// Send one frame.
    ///
    /// # Errors
    /// The send failed.
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.tx
            .send_to(frame, None)
            .unwrap_or_else(|| Err(std::io::Error::other("send_to returned nothing")))
    }
}
