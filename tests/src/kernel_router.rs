//! The kernel router of the differential tests: namespace G forwards between A (behind
//! G's `ga`) and B (behind `gb`), each side one veth pair with fixed MACs. Nobody in A or
//! B owns the neighbour MACs G sends to, so A's and B's stacks drop what G forwards and
//! never answer: the tests inject frames with [`crate::inject`] and read what G did
//! (conntrack state, or the forwarded frame with [`crate::capture`]).

use crate::netns::{self, CommandError, NetNs};

/// G's MAC on `ga` (side A, 10.0.1.1/24).
pub const GA_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
/// G's MAC on `gb` (side B, 10.0.2.1/24).
pub const GB_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 1];
/// The MAC of every neighbour G knows on side A.
pub const A_NEIGHBOUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];
/// The MAC of every neighbour G knows on side B.
pub const B_NEIGHBOUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 2];

/// `aa:bb:..` as `ip` takes it.
#[must_use]
pub fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The three namespaces, removed when dropped. Frames go into A's `va` and B's `vb`.
#[derive(Debug)]
pub struct KernelRouter {
    /// G, the router (`ga`, `gb`; IPv4 forwarding on, reverse-path filter and
    /// redirects off, IPv6 off).
    pub gw: NetNs,
    /// Side A (`va`).
    pub a: NetNs,
    /// Side B (`vb`).
    pub b: NetNs,
}

impl KernelRouter {
    /// Builds the namespaces (names from `tag`: `<tag>g`, `<tag>a`, `<tag>b`, unique to
    /// this process) with permanent neighbour entries on G for `a_neighbours` (on `ga`,
    /// [`A_NEIGHBOUR_MAC`]) and `b_neighbours` (on `gb`, [`B_NEIGHBOUR_MAC`]).
    ///
    /// # Errors
    /// A command failed (no privilege, `ip` missing, a name in use).
    pub fn setup(
        tag: &str,
        a_neighbours: &[&str],
        b_neighbours: &[&str],
    ) -> Result<Self, CommandError> {
        let gw = NetNs::new(&netns::unique_name(&format!("{tag}g")))?;
        let a = NetNs::new(&netns::unique_name(&format!("{tag}a")))?;
        let b = NetNs::new(&netns::unique_name(&format!("{tag}b")))?;
        for ns in [&gw, &a, &b] {
            ns.sysctl(&[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])?;
            ns.ip(&["link", "set", "lo", "up"])?;
        }
        for (g, v, gmac, ns, addr, peer_mac, peers) in [
            (
                "ga",
                "va",
                GA_MAC,
                &a,
                "10.0.1.1/24",
                A_NEIGHBOUR_MAC,
                a_neighbours,
            ),
            (
                "gb",
                "vb",
                GB_MAC,
                &b,
                "10.0.2.1/24",
                B_NEIGHBOUR_MAC,
                b_neighbours,
            ),
        ] {
            gw.ip(&[
                "link",
                "add",
                g,
                "address",
                &mac_text(gmac),
                "type",
                "veth",
                "peer",
                "name",
                v,
                "netns",
                ns.name(),
            ])?;
            gw.ip(&["addr", "add", addr, "dev", g])?;
            gw.ip(&["link", "set", g, "up"])?;
            ns.ip(&["link", "set", v, "up"])?;
            for p in peers {
                gw.ip(&[
                    "neigh",
                    "replace",
                    p,
                    "lladdr",
                    &mac_text(peer_mac),
                    "dev",
                    g,
                    "nud",
                    "permanent",
                ])?;
            }
        }
        gw.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.ga.rp_filter=0",
            "net.ipv4.conf.gb.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.all.accept_local=0",
        ])?;
        Ok(Self { gw, a, b })
    }
}
