//! The agent-side record of each connection's hardware state, kept apart from the
//! connection itself (fallback-sw must not know hardware exists), in a side table keyed
//! by [`ConnHandle`].
//!
//! The connection's hardware state is the enum [`HwState`]:
//!
//! ```text
//!   None ──insert queued──> Pending ──both inserts OK──> Offloaded
//!    ^                        │ a failure                  │ idle / FIN-RST / displaced /
//!    │                        v                            v operator delete
//!    └──────after action── Dead <──all deletes done── Dying
//! ```
//!
//! A connection is freed (or returned to software) only from `Dead`, that is once
//! every rule built for it is confirmed gone from the device (invariant 2).

use ctoffload_driver::device::FlowCommand;
use ctoffload_fallback_sw::conntrack::Teardown;
use ctoffload_fallback_sw::table::{Counter, Slot};
use ctoffload_fallback_sw::tuple::Dir;
use ctoffload_hw_regs::FlowId;

use super::hw_rule::HwRule;
use super::policy::{Backoff, NotOffloaded};

/// A connection held across time: its table slot and its id (a slot is reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnHandle {
    /// Table slot.
    pub slot: Slot,
    /// Connection id.
    pub id: u64,
}

/// The connection's hardware state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwState {
    /// No rule in hardware; `reason` in the record says why.
    None,
    /// Inserts queued or in flight.
    Pending,
    /// Both directions' rules are installed.
    Offloaded,
    /// Deletes queued or in flight; `AfterDelete` runs once they are all done.
    Dying(AfterDelete),
    /// Every rule is gone (transient: the after-action runs and the state becomes
    /// `None`, or the record is freed).
    Dead,
}

/// What happens once a dying connection's rules are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterDelete {
    /// Return it to software with this conntrack fix-up, and remember why.
    Return(Teardown, NotOffloaded),
    /// Delete the connection from software too (operator delete, orphan).
    Free,
}

/// One direction's device entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Not in the device.
    Absent,
    /// Insert queued or in flight.
    Inserting,
    /// Installed in this slot, with this generation.
    Installed {
        /// Slot.
        flow_id: FlowId,
        /// Generation.
        generation: u8,
    },
    /// Delete queued or in flight for this slot.
    Deleting {
        /// Slot.
        flow_id: FlowId,
        /// Generation.
        generation: u8,
    },
    /// The insert failed with this reason.
    Failed(NotOffloaded),
}

impl Entry {
    /// Whether a command is outstanding for this entry.
    #[must_use]
    pub fn busy(self) -> bool {
        matches!(self, Self::Inserting | Self::Deleting { .. })
    }
}

/// The side-table record of one connection.
#[derive(Debug, Clone, Copy)]
pub struct HwConn {
    /// The connection's table slot.
    pub slot: Slot,
    /// Hardware state.
    pub state: HwState,
    /// Why it is not in hardware (meaningful in `None`, kept for reporting).
    pub reason: Option<NotOffloaded>,
    /// Port the original direction arrives on (known once a packet was seen).
    pub orig_in: Option<u8>,
    /// L2 header length per direction (to turn device L2 byte counts into L3 bytes).
    pub l2_len: [u8; 2],
    /// The rules built at insert time (the delete must name the same keys).
    pub rules: Option<[HwRule; 2]>,
    /// Per-direction device entry.
    pub entries: [Entry; 2],
    /// Last packet the slow path saw (agent time, ns).
    pub sw_last_seen: u64,
    /// Last hardware hit (agent time, ns; 0 = none).
    pub hw_last_hit: u64,
    /// When it went to hardware (agent time, ns).
    pub offloaded_at: u64,
    /// Retry backoff after insert failures.
    pub backoff: Backoff,
    /// A teardown packet was seen while inserts were in flight: delete on completion.
    pub abort: bool,
    /// An operator delete is waiting for outstanding commands: free when dead.
    pub free_requested: bool,
    /// The conntrack timeout it had before the worker held it for an outstanding
    /// command (restored when the rules are dead).
    pub held_timeout: Option<u64>,
    /// The part of the connection's counters that hardware counted, per direction
    /// (L3 bytes, as folded into conntrack).
    pub hw_counters: [Counter; 2],
    /// When its inserts were queued (agent time, ns): time to offload starts here.
    pub queued_at: u64,
    /// The TCP state the slow path last saw (state-change events).
    pub tcp_state: Option<ctoffload_fallback_sw::tcp::TcpState>,
}

impl HwConn {
    /// A fresh record: not offloaded, waiting for the policy.
    #[must_use]
    pub fn new(slot: Slot, now: u64) -> Self {
        Self {
            slot,
            state: HwState::None,
            reason: None,
            orig_in: None,
            l2_len: [14, 14],
            rules: None,
            entries: [Entry::Absent; 2],
            sw_last_seen: now,
            hw_last_hit: 0,
            offloaded_at: 0,
            backoff: Backoff::default(),
            abort: false,
            free_requested: false,
            held_timeout: None,
            hw_counters: [Counter::default(); 2],
            queued_at: 0,
            tcp_state: None,
        }
    }

    /// The newest activity seen from either path (invariant 1: liveness is the newer
    /// of software last-seen and hardware last-hit).
    #[must_use]
    pub fn last_active(&self) -> u64 {
        self.sw_last_seen
            .max(self.hw_last_hit)
            .max(self.offloaded_at)
    }

    /// Whether any command is outstanding.
    #[must_use]
    pub fn busy(&self) -> bool {
        self.entries.iter().any(|e| e.busy())
    }
}

/// Two counters added (saturating).
#[must_use]
pub(super) fn add(a: Counter, b: Counter) -> Counter {
    Counter {
        packets: a.packets.saturating_add(b.packets),
        bytes: a.bytes.saturating_add(b.bytes),
    }
}

/// What a queued or in-flight command is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdKind {
    /// Insert of one direction's rule.
    Insert,
    /// Delete of one direction's rule.
    Delete,
    /// Delete of an entry no connection owns any more (late insert completion).
    Orphan,
}

/// A command and what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tagged {
    /// The command.
    pub cmd: FlowCommand,
    /// Connection.
    pub conn: ConnHandle,
    /// Direction.
    pub dir: Dir,
    /// Purpose.
    pub kind: CmdKind,
}
