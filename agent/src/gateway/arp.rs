//! The neighbour (ARP) table: resolved entries with a lifetime, unresolved next hops
//! with a bounded queue of waiting packets and request retries with backoff.

use std::collections::{HashMap, VecDeque};

/// Neighbour-table settings (all times in ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpConfig {
    /// How long a resolved entry is used before it must be resolved again.
    pub reachable_ns: u64,
    /// Delay before the first retry of a request; doubles with each retry.
    pub retry_ns: u64,
    /// Requests sent before a next hop is given up (its queue dropped).
    pub max_requests: u32,
    /// Packets queued per unresolved next hop (more are dropped).
    pub queue_len: usize,
    /// Entries kept at most (new unresolved next hops beyond that are refused).
    pub max_entries: usize,
}

impl Default for ArpConfig {
    fn default() -> Self {
        Self {
            reachable_ns: 30_000_000_000,
            retry_ns: 1_000_000_000,
            max_requests: 3,
            queue_len: 3,
            max_entries: 4096,
        }
    }
}

/// One neighbour.
#[derive(Debug)]
enum Neigh {
    /// Resolved: usable until `expires`.
    Reachable { mac: [u8; 6], expires: u64 },
    /// Being resolved: `sent` requests so far, the next at `next`, packets waiting.
    Incomplete {
        sent: u32,
        next: u64,
        queue: VecDeque<Vec<u8>>,
    },
}

/// What [`ArpTable::resolve`] decided for one packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolve {
    /// Send with this destination MAC.
    Mac([u8; 6]),
    /// Queued; send an ARP request now (first packet for this next hop).
    QueuedSendRequest,
    /// Queued behind a request in flight.
    Queued,
    /// Dropped: the queue (or the table) is full.
    Dropped,
}

/// Timer work from [`ArpTable::poll`].
#[derive(Debug, Default)]
pub struct ArpTimers {
    /// (port, next hop) pairs to send another request for.
    pub retry: Vec<(usize, [u8; 4])>,
    /// Packets dropped because their next hop did not answer.
    pub failed_packets: u64,
    /// Next hops given up.
    pub failed: u64,
}

/// The neighbour table of all ports, keyed by (port, IPv4 address).
#[derive(Debug)]
pub struct ArpTable {
    cfg: ArpConfig,
    map: HashMap<(usize, [u8; 4]), Neigh>,
}

impl ArpTable {
    /// An empty table.
    #[must_use]
    pub fn new(cfg: ArpConfig) -> Self {
        Self {
            cfg,
            map: HashMap::new(),
        }
    }

    /// The resolved MAC of `ip` on `port`, if any and not expired.
    #[must_use]
    pub fn lookup(&self, port: usize, ip: [u8; 4], now: u64) -> Option<[u8; 6]> {
        match self.map.get(&(port, ip)) {
            Some(Neigh::Reachable { mac, expires }) if *expires > now => Some(*mac),
            _ => None,
        }
    }

    /// Every resolved entry: (port, address, MAC).
    pub fn entries(&self) -> impl Iterator<Item = (usize, [u8; 4], [u8; 6])> + '_ {
        self.map.iter().filter_map(|(&(p, ip), n)| match n {
            Neigh::Reachable { mac, .. } => Some((p, ip, *mac)),
            Neigh::Incomplete { .. } => None,
        })
    }

    /// The MAC for a packet to `ip` on `port`, or queue the packet (`frame`) until it is
    /// resolved.
    pub fn resolve(&mut self, port: usize, ip: [u8; 4], frame: &[u8], now: u64) -> Resolve {
        let full = self.map.len() >= self.cfg.max_entries;
        let qlen = self.cfg.queue_len;
        // Allocated only when the packet is queued.
        let fresh = || {
            let mut q = VecDeque::new();
            if qlen > 0 {
                q.push_back(frame.to_vec());
            }
            q
        };
        match self.map.get_mut(&(port, ip)) {
            Some(Neigh::Reachable { mac, expires }) if *expires > now => Resolve::Mac(*mac),
            Some(Neigh::Incomplete { queue, .. }) => {
                if queue.len() >= self.cfg.queue_len {
                    return Resolve::Dropped;
                }
                queue.push_back(frame.to_vec());
                Resolve::Queued
            }
            Some(n) => {
                // Expired: resolve again.
                *n = Neigh::Incomplete {
                    sent: 1,
                    next: now.saturating_add(self.cfg.retry_ns),
                    queue: fresh(),
                };
                Resolve::QueuedSendRequest
            }
            None if full => Resolve::Dropped,
            None => {
                let queue = fresh();
                self.map.insert(
                    (port, ip),
                    Neigh::Incomplete {
                        sent: 1,
                        next: now.saturating_add(self.cfg.retry_ns),
                        queue,
                    },
                );
                Resolve::QueuedSendRequest
            }
        }
    }

    /// Learns `ip` is at `mac` on `port`. `create`: add an entry if there is none
    /// (a request or reply addressed to us); otherwise only update an existing one
    /// (Linux does not create entries from every ARP packet it overhears). Returns the
    /// packets that were waiting for it, to be sent to `mac`.
    pub fn learn(
        &mut self,
        port: usize,
        ip: [u8; 4],
        mac: [u8; 6],
        create: bool,
        now: u64,
    ) -> VecDeque<Vec<u8>> {
        let expires = now.saturating_add(self.cfg.reachable_ns);
        match self.map.get_mut(&(port, ip)) {
            Some(n) => {
                let old = std::mem::replace(n, Neigh::Reachable { mac, expires });
                match old {
                    Neigh::Incomplete { queue, .. } => queue,
                    Neigh::Reachable { .. } => VecDeque::new(),
                }
            }
            None => {
                if create && self.map.len() < self.cfg.max_entries {
                    self.map
                        .insert((port, ip), Neigh::Reachable { mac, expires });
                }
                VecDeque::new()
            }
        }
    }

    /// Retries and failures due at `now`; forgets entries that expired long ago.
    pub fn poll(&mut self, now: u64) -> ArpTimers {
        let mut t = ArpTimers::default();
        let cfg = self.cfg;
        self.map.retain(|&(port, ip), n| match n {
            Neigh::Reachable { expires, .. } => {
                // Keep stale entries one more lifetime (re-resolved on use), then forget.
                *expires > now.saturating_sub(cfg.reachable_ns)
            }
            Neigh::Incomplete { sent, next, queue } => {
                if *next > now {
                    return true;
                }
                if *sent >= cfg.max_requests {
                    t.failed += 1;
                    t.failed_packets += u64::try_from(queue.len()).unwrap_or(u64::MAX);
                    return false;
                }
                let backoff = cfg.retry_ns.saturating_mul(1u64 << (*sent).min(16));
                *sent += 1;
                *next = now.saturating_add(backoff);
                t.retry.push((port, ip));
                true
            }
        });
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: [u8; 4] = [10, 0, 0, 1];
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    #[test]
    fn queue_then_resolve_releases_packets() {
        let mut t = ArpTable::new(ArpConfig {
            queue_len: 2,
            ..ArpConfig::default()
        });
        assert_eq!(t.resolve(0, IP, b"a", 0), Resolve::QueuedSendRequest);
        assert_eq!(t.resolve(0, IP, b"b", 1), Resolve::Queued);
        assert_eq!(t.resolve(0, IP, b"c", 2), Resolve::Dropped);
        let q = t.learn(0, IP, MAC, false, 3);
        assert_eq!(q, [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(t.resolve(0, IP, b"d", 4), Resolve::Mac(MAC));
        assert_eq!(t.lookup(1, IP, 4), None, "per port");
    }

    #[test]
    fn retries_back_off_then_give_up() {
        let cfg = ArpConfig {
            retry_ns: 100,
            max_requests: 3,
            ..ArpConfig::default()
        };
        let mut t = ArpTable::new(cfg);
        assert_eq!(t.resolve(0, IP, b"a", 0), Resolve::QueuedSendRequest);
        assert!(t.poll(99).retry.is_empty());
        assert_eq!(t.poll(100).retry, [(0, IP)]); // 2nd request, next after 200
        assert!(t.poll(299).retry.is_empty());
        assert_eq!(t.poll(300).retry, [(0, IP)]); // 3rd request, next after 400
        assert!(t.poll(699).retry.is_empty());
        let gone = t.poll(700);
        assert_eq!((gone.failed, gone.failed_packets), (1, 1));
        assert_eq!(t.resolve(0, IP, b"x", 701), Resolve::QueuedSendRequest);
    }

    #[test]
    fn entries_expire_and_learning_only_creates_when_asked() {
        let mut t = ArpTable::new(ArpConfig {
            reachable_ns: 1000,
            ..ArpConfig::default()
        });
        assert!(t.learn(0, IP, MAC, false, 0).is_empty());
        assert_eq!(t.lookup(0, IP, 0), None);
        t.learn(0, IP, MAC, true, 0);
        assert_eq!(t.lookup(0, IP, 999), Some(MAC));
        assert_eq!(t.lookup(0, IP, 1000), None);
        assert_eq!(t.resolve(0, IP, b"a", 1000), Resolve::QueuedSendRequest);
        assert_eq!(t.entries().count(), 0);
    }
}
