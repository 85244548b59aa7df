//! Per device slot: which connection direction owns it, the counter baseline of the
//! last pull, and the hardware counts not yet folded into the connection. Three flat
//! arrays indexed by flow id:
//!
//! - the *seen* array (16 bytes a slot, four per cache line): raw packets and bytes at
//!   the last pull, generation and flags, and the *unfolded* packets: what the pulls
//!   found since the slot's counts were last folded into its connection. The
//!   reconciler's sweep reads and writes this array in slot order next to the counter
//!   records: a slot whose counters moved costs one line of it, and no access to its
//!   connection (lazy folding);
//! - the *hits* array (8 bytes a slot): the raw hardware last-hit of each slot of ours
//!   (`NO_HITS` for the others), written with each move; finding the slots that may be
//!   idle reads it ([`Slots::idle_candidates`]), but only in the groups of
//!   [`IDLE_GROUP`] slots whose *idle floor* (a lower bound of their slots' last hits,
//!   8 bytes a group) says one may be idle: a pass over a table whose flows are all
//!   active reads the floors (8 bytes per 64 slots), not the hits;
//! - the *owner* array: the connection direction, when its rule went in, the L2 header
//!   length, the partner slot, when the connection's conntrack timeout is next kept
//!   alive, and the raw byte counter at the slot's last fold. Read for slots that may
//!   be idle and when counts are folded.
//!
//! The unfolded bytes are not stored: they are the raw byte counter at the last pull
//! minus its value at the last fold (or insert), mod 2^48, which is exact while fewer
//! than 2^48 bytes are unfolded. That holds because the unfolded packets stay below
//! 2^32 and a move is kept unfolded only with at most 2^16 bytes a packet
//! ([`MAX_BYTES_PER_PACKET_SHIFT`]; the device's frames are far shorter): a move that
//! breaks either bound is folded at once, with everything unfolded before it.
//!
//! A slot's unfolded counts are folded into its connection exactly once: when the slot
//! leaves (delete completion with the final counters, a device fault, a lost entry),
//! when the unfolded count would overflow, or when every slot is folded at once
//! ([`Slots::take_all_unfolded`]). Readers add them on read ([`Slots::unfolded`]).
//!
//! Deltas are wrap-safe as device.md section 11.2 requires: `(new − old) mod 2^32` for
//! packets and `mod 2^48` for bytes while the slot keeps its generation; the first value
//! seen for a generation is the delta since insert (counters are cleared by insert).
//! Unfolded counts never wrap: a pull that would overflow them hands them out to be
//! folded at once.
//!
//! The slot table also keeps the keep-alive schedule of offloaded connections: the
//! conntrack timeout of an offloaded connection is held a day ahead and must be
//! extended once less than 5 minutes remain, which a counter move no longer does.
//! One slot per connection (the one [`Slots::pair`] names first) is scheduled; the
//! reconciler takes due entries with [`Slots::next_keepalive`].

use std::collections::BTreeSet;

use ctoffload_driver::CounterSample;
use ctoffload_fallback_sw::tuple::Dir;
use ctoffload_hw_regs::limits::BYTE_COUNTER_MASK;
use ctoffload_hw_regs::{FlowCounters, FlowId};

use super::state::ConnHandle;

/// Slots per idle floor ([`Slots::idle_candidates`]).
pub const IDLE_GROUP: usize = 64;
/// No partner slot.
const NONE: u32 = u32::MAX;
/// `Slots::hits` of a slot that is not ours.
const NO_HITS: u64 = u64::MAX;
/// `Seen` flag: a rule of ours is installed in the slot.
const OWNED: u8 = 1;
/// `Seen` flag: a baseline exists for this generation.
const PULLED: u8 = 2;
/// `Seen::tagged_bytes`: the raw byte counter's bits; above them the generation, then
/// the flags.
const GENERATION_SHIFT: u32 = 48;
const FLAGS_SHIFT: u32 = 56;
/// A counter move of more than `packets << MAX_BYTES_PER_PACKET_SHIFT` bytes (64 KiB a
/// packet; `MAX_FRAME_LEN` is 9216) is folded at once: it keeps the unfolded bytes,
/// derived from the raw byte counter (48 bits), below 2^48 while the unfolded packets
/// are below 2^32, whatever a device reports.
pub const MAX_BYTES_PER_PACKET_SHIFT: u32 = 16;
/// When an offloaded connection's conntrack timeout is first kept alive, after its
/// first rule went in: conntrack holds it a day ahead from when it was marked
/// offloaded (just before the inserts, or at restore), so ten minutes before that,
/// early enough for inserts that took minutes; the reconciler then reschedules from the
/// timeout itself.
pub const FIRST_KEEPALIVE_NS: u64 = (86_400 - 600) * 1_000_000_000;
/// `Owner::keepalive_at`: not scheduled.
const NOT_SCHEDULED: u64 = u64::MAX;

/// The hot part of a slot: what the last pull saw, and the packets not folded yet.
/// Aligned to its size, so that a record never straddles two cache lines.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(16))]
struct Seen {
    /// Raw packet counter at the last pull.
    packets: u32,
    /// Packets pulled but not folded into the connection.
    unfolded_packets: u32,
    /// Raw byte counter at the last pull (low 48 bits), generation, flags.
    tagged_bytes: u64,
}

const _: () = assert!(size_of::<Seen>() == 16 && align_of::<Seen>() == 16);

/// Packets and bytes (L2, as the device counts them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Packets.
    pub packets: u64,
    /// Bytes, L2.
    pub bytes: u64,
}

impl Counts {
    /// No packet and no byte.
    #[must_use]
    pub fn is_zero(&self) -> bool {
        self.packets == 0 && self.bytes == 0
    }

    /// The sum (saturating).
    #[must_use]
    pub fn plus(self, o: Self) -> Self {
        Self {
            packets: self.packets.saturating_add(o.packets),
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }
}

/// The cold part of a slot: who owns it.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    /// The connection.
    pub conn: ConnHandle,
    /// The direction whose rule is installed here.
    pub dir: Dir,
    /// When the rule was installed (agent time).
    pub since: u64,
    /// L2 header length of this direction (device bytes → L3 bytes).
    pub l2_len: u8,
    /// When the connection's conntrack timeout is next kept alive through this slot
    /// (`NOT_SCHEDULED`: not through this slot).
    keepalive_at: u64,
    /// The raw byte counter (48 bits) when the slot's counts were last folded (0 at
    /// insert): the unfolded bytes are the pulled raw bytes minus this.
    folded_bytes: u64,
    /// The slot of the connection's other direction.
    partner: u32,
}

impl Owner {
    /// The owner of a slot installed at `since`, not paired, no keep-alive scheduled.
    #[must_use]
    pub fn new(owner: (ConnHandle, Dir), since: u64, l2_len: u8) -> Self {
        Self {
            conn: owner.0,
            dir: owner.1,
            since,
            l2_len,
            keepalive_at: NOT_SCHEDULED,
            folded_bytes: 0,
            partner: NONE,
        }
    }

    /// The partner slot, if both directions are installed.
    #[must_use]
    pub fn partner(&self) -> Option<FlowId> {
        (self.partner != NONE)
            .then(|| FlowId::new(self.partner))
            .flatten()
    }
}

/// A delta since the previous pull (or since insert).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    /// Packets and bytes.
    pub counts: Counts,
    /// Device last-hit (0 = never).
    pub last_hit: u64,
}

/// What a counter record says about a slot, against the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Not one of our rules (empty, or another generation than the one we installed).
    NotOurs,
    /// Our rule; its counters did not move. The raw last-hit of the slot.
    Unchanged {
        /// Device time of the last hit (0 = never).
        last_hit: u64,
    },
    /// Our rule; its counters moved by this much (the baseline is updated and the
    /// delta is kept unfolded in the slot).
    Moved(Counts),
    /// Our rule; its counters moved by `delta`, and the slot's unfolded counts would
    /// overflow: `unfolded` (everything not folded yet, `delta` included) was taken
    /// out of the slot and must be folded now.
    MovedFoldNow {
        /// The move since the previous pull.
        delta: Counts,
        /// What must be folded into the connection.
        unfolded: Counts,
    },
}

/// Unfolded counts taken out of a slot, with what is needed to fold them.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    /// The owner of the slot.
    pub owner: Owner,
    /// What was not folded yet.
    pub unfolded: Counts,
}

/// What a slot's delete completion leaves to do.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    /// The slot's unfolded counts and owner (the final delta included).
    pub taken: Taken,
    /// The final delta since the last pull (for the worker's statistics).
    pub last: Delta,
}

impl Seen {
    fn flags(&self) -> u8 {
        u8::try_from(self.tagged_bytes >> FLAGS_SHIFT).unwrap_or(0)
    }

    fn generation(&self) -> u8 {
        u8::try_from((self.tagged_bytes >> GENERATION_SHIFT) & 0xFF).unwrap_or(0)
    }

    fn bytes(&self) -> u64 {
        self.tagged_bytes & BYTE_COUNTER_MASK
    }

    fn owned(&self) -> bool {
        self.flags() & OWNED != 0
    }

    fn pulled(&self) -> bool {
        self.flags() & PULLED != 0
    }

    fn set(&mut self, bytes: u64, generation: u8, flags: u8) {
        self.tagged_bytes = (bytes & BYTE_COUNTER_MASK)
            | (u64::from(generation) << GENERATION_SHIFT)
            | (u64::from(flags) << FLAGS_SHIFT);
    }

    fn fresh(generation: u8) -> Self {
        let mut s = Self::default();
        s.set(0, generation, OWNED);
        s
    }

    /// The unfolded counts, the bytes against the raw byte counter at the last fold.
    fn unfolded(&self, folded_bytes: u64) -> Counts {
        Counts {
            packets: u64::from(self.unfolded_packets),
            bytes: self.bytes().wrapping_sub(folded_bytes) & BYTE_COUNTER_MASK,
        }
    }

    /// The move to `c`; the baseline becomes `c`.
    fn rebase(&mut self, c: &FlowCounters) -> Counts {
        let bytes = c.bytes & BYTE_COUNTER_MASK;
        let counts = if self.pulled() {
            Counts {
                packets: u64::from(c.packets.wrapping_sub(self.packets)),
                bytes: bytes.wrapping_sub(self.bytes()) & BYTE_COUNTER_MASK,
            }
        } else {
            Counts {
                packets: u64::from(c.packets),
                bytes,
            }
        };
        let (generation, flags) = (self.generation(), self.flags() | PULLED);
        self.set(bytes, generation, flags);
        self.packets = c.packets;
        counts
    }
}

/// The unfolded counts of the slot with hot part `seen` and owner `owner`.
fn unfolded_of(seen: &Seen, owner: Option<&Owner>) -> Counts {
    seen.unfolded(owner.map_or(0, |o| o.folded_bytes))
}

/// Takes the unfolded counts out of a slot: nothing is unfolded afterwards.
fn take_unfolded_of(seen: &mut Seen, owner: Option<&mut Owner>) -> Counts {
    let c = unfolded_of(seen, owner.as_deref());
    seen.unfolded_packets = 0;
    if let Some(o) = owner {
        o.folded_bytes = seen.bytes();
    }
    c
}

/// The raw device last-hits below which a slot is idle at `now`: its last hit (device
/// time moved to agent time by `time_offset_ns`; never hit counts as 0) is more than
/// `min_idle` before `now`. `NO_HITS` is never below it.
fn idle_limit(now: u64, min_idle: u64, time_offset_ns: i64) -> u64 {
    if now <= min_idle {
        return 0;
    }
    // A hit at device time `t` is at agent time `t + offset` (saturating); never hit
    // (0) is idle whenever `now > min_idle`.
    let limit = i128::from(now - min_idle) - i128::from(time_offset_ns);
    u64::try_from(limit.max(1)).unwrap_or(NO_HITS)
}

/// Agent time `t` in device time (`agent = device + offset`), within `0..NO_HITS`.
fn device_time(t: u64, time_offset_ns: i64) -> u64 {
    let d = i128::from(t) - i128::from(time_offset_ns);
    u64::try_from(d.max(0)).map_or(NO_HITS - 1, |d| d.min(NO_HITS - 1))
}

/// The slot table.
#[derive(Debug, Clone, Default)]
pub struct Slots {
    seen: Vec<Seen>,
    /// Raw device last-hit per slot of ours (`NO_HITS`: not ours).
    hits: Vec<u64>,
    owners: Vec<Option<Owner>>,
    /// Per group of [`IDLE_GROUP`] slots, a lower bound of their *idle references*:
    /// the raw last hit of a slot of ours, or for one never hit its install time in
    /// device time (`NO_HITS` for the others). Lowered by installs and moves,
    /// recomputed when the group is scanned.
    idle_floor: Vec<u64>,
    /// (due, slot) of every scheduled keep-alive; mirrors `Owner::keepalive_at`.
    keepalive: BTreeSet<(u64, u32)>,
}

fn idx(id: FlowId) -> usize {
    usize::try_from(id.get()).unwrap_or(usize::MAX)
}

impl Slots {
    /// `n` empty slots.
    #[must_use]
    pub fn new(n: usize) -> Self {
        Self {
            seen: vec![Seen::default(); n],
            hits: vec![NO_HITS; n],
            owners: vec![None; n],
            idle_floor: vec![NO_HITS; n.div_ceil(IDLE_GROUP)],
            keepalive: BTreeSet::new(),
        }
    }

    /// The owner record of a slot.
    #[must_use]
    pub fn get(&self, id: FlowId) -> Option<&Owner> {
        self.owners.get(idx(id)).and_then(Option::as_ref)
    }

    /// The owner of a slot.
    #[must_use]
    pub fn owner(&self, id: FlowId) -> Option<(ConnHandle, Dir)> {
        self.get(id).map(|o| (o.conn, o.dir))
    }

    /// The raw device last-hit of a slot at the last pull (0 = never, or not ours).
    #[must_use]
    pub fn last_hit(&self, id: FlowId) -> u64 {
        self.hits
            .get(idx(id))
            .copied()
            .filter(|&h| h != NO_HITS)
            .unwrap_or(0)
    }

    /// The counts pulled from slot `id` that are not folded into its connection yet
    /// (zero when not ours).
    #[must_use]
    pub fn unfolded(&self, id: FlowId) -> Counts {
        let i = idx(id);
        self.seen
            .get(i)
            .filter(|s| s.owned())
            .map_or_else(Counts::default, |s| unfolded_of(s, self.get(id)))
    }

    /// Whether slot number `i` holds one of our rules (the sweep skips the records of
    /// the others without reading them).
    #[must_use]
    pub fn owned_at(&self, i: usize) -> bool {
        self.seen.get(i).is_some_and(Seen::owned)
    }

    /// The slots of ours in `range` whose last hardware hit (device time moved to
    /// agent time by `time_offset_ns`; never hit counts as 0) is more than `min_idle`
    /// before `now`, with that time, appended to `out` in slot order; a slot never hit
    /// only once it was installed more than `min_idle` before `now` (before, the idle
    /// check would keep it anyway). The idle check of a sweep whose dump reports only
    /// the slots that were hit: reads the hits array (8 bytes a slot, sequential) only
    /// in the groups whose idle floor is below the limit, and recomputes their floor.
    pub fn idle_candidates(
        &mut self,
        range: std::ops::Range<usize>,
        now: u64,
        min_idle: u64,
        time_offset_ns: i64,
        out: &mut Vec<(FlowId, u64)>,
    ) {
        if self.hits.get(range.clone()).is_none() {
            return;
        }
        let limit = idle_limit(now, min_idle, time_offset_ns);
        let mut group = range.start / IDLE_GROUP;
        while group.saturating_mul(IDLE_GROUP) < range.end {
            let Some(&floor) = self.idle_floor.get(group) else {
                return;
            };
            if floor < limit {
                self.scan_idle_group(group, &range, limit, time_offset_ns, out);
            }
            group += 1;
        }
    }

    /// One group of the idle scan: its slots in `range` whose raw last hit is below
    /// `limit` go to `out`; its floor becomes the least idle reference of its slots.
    fn scan_idle_group(
        &mut self,
        group: usize,
        range: &std::ops::Range<usize>,
        limit: u64,
        time_offset_ns: i64,
        out: &mut Vec<(FlowId, u64)>,
    ) {
        let first = group.saturating_mul(IDLE_GROUP);
        let last = first.saturating_add(IDLE_GROUP).min(self.hits.len());
        let mut floor = NO_HITS;
        for i in first..last {
            let raw = self.hits.get(i).copied().unwrap_or(NO_HITS);
            let reference = if raw == 0 {
                // Never hit: idle from its install time (agent time) on.
                self.owners
                    .get(i)
                    .and_then(Option::as_ref)
                    .map_or(0, |o| device_time(o.since, time_offset_ns))
            } else {
                raw
            };
            floor = floor.min(reference);
            if raw >= limit || !range.contains(&i) {
                continue;
            }
            let hw = if raw == 0 {
                0
            } else {
                raw.saturating_add_signed(time_offset_ns)
            };
            if reference >= limit {
                // Never hit, installed less than the idle time ago.
                continue;
            }
            if let Some(id) = u32::try_from(i).ok().and_then(FlowId::new) {
                out.push((id, hw));
            }
        }
        if let Some(f) = self.idle_floor.get_mut(group) {
            *f = floor;
        }
    }

    /// Compares a counter record with the slot's baseline: the sweep's per-slot step.
    /// Reads only the seen array; writes it and the hits array only when the counters
    /// moved, and then keeps the move in the slot (no access to the connection; the
    /// owner only when the move must be folded at once).
    #[inline]
    pub fn observe(&mut self, s: &CounterSample) -> Observed {
        let i = idx(s.flow_id);
        let Some(seen) = self.seen.get_mut(i) else {
            return Observed::NotOurs;
        };
        if !seen.owned() || !s.valid || s.generation != seen.generation() {
            return Observed::NotOurs;
        }
        let c = &s.counters;
        if seen.pulled() && seen.packets == c.packets && seen.bytes() == c.bytes & BYTE_COUNTER_MASK
        {
            return Observed::Unchanged {
                last_hit: self.hits.get(i).copied().unwrap_or(0),
            };
        }
        let before = *seen;
        let delta = seen.rebase(c);
        if let Some(h) = self.hits.get_mut(i) {
            *h = c.last_hit;
        }
        if let Some(f) = self.idle_floor.get_mut(i / IDLE_GROUP) {
            *f = (*f).min(c.last_hit);
        }
        let packets = u64::from(seen.unfolded_packets).saturating_add(delta.packets);
        match u32::try_from(packets) {
            Ok(p) if delta.bytes <= delta.packets << MAX_BYTES_PER_PACKET_SHIFT => {
                seen.unfolded_packets = p;
                Observed::Moved(delta)
            }
            _ => {
                // Everything unfolded before this move, and the move.
                let owner = self.owners.get_mut(i).and_then(Option::as_mut);
                let unfolded = unfolded_of(&before, owner.as_deref()).plus(delta);
                take_unfolded_of(seen, owner);
                Observed::MovedFoldNow { delta, unfolded }
            }
        }
    }

    /// A rule was installed at `since`: new owner, no baseline (the first pull is
    /// since insert), nothing unfolded. The caller took out what a previous owner
    /// left ([`Slots::release`]).
    pub fn install(
        &mut self,
        id: FlowId,
        owner: (ConnHandle, Dir),
        generation: u8,
        since: u64,
        l2_len: u8,
    ) {
        self.unschedule(id);
        let i = idx(id);
        if let (Some(s), Some(o), Some(h)) = (
            self.seen.get_mut(i),
            self.owners.get_mut(i),
            self.hits.get_mut(i),
        ) {
            *s = Seen::fresh(generation);
            *o = Some(Owner::new(owner, since, l2_len));
            *h = 0;
        }
        if let Some(f) = self.idle_floor.get_mut(i / IDLE_GROUP) {
            // Until the group is next scanned (which puts the install time instead).
            *f = 0;
        }
    }

    /// Links the two directions' slots of one connection, which is offloaded from
    /// now on: its first keep-alive (through `a`) is due [`FIRST_KEEPALIVE_NS`] after
    /// `a` was installed.
    pub fn pair(&mut self, a: FlowId, b: FlowId) {
        let mut since = None;
        if let Some(Some(o)) = self.owners.get_mut(idx(a)) {
            o.partner = b.get();
            since = Some(o.since);
        }
        if let Some(Some(o)) = self.owners.get_mut(idx(b)) {
            o.partner = a.get();
        }
        if let Some(at) = since {
            self.schedule_keepalive(a, at.saturating_add(FIRST_KEEPALIVE_NS));
        }
    }

    /// Schedules the keep-alive of slot `id`'s connection at `at` (replacing any).
    pub fn schedule_keepalive(&mut self, id: FlowId, at: u64) {
        self.unschedule(id);
        if let Some(Some(o)) = self.owners.get_mut(idx(id)) {
            o.keepalive_at = at;
            self.keepalive.insert((at, id.get()));
        }
    }

    /// The next slot whose keep-alive is due at `now`, with its connection; it is no
    /// longer scheduled (reschedule with [`Slots::schedule_keepalive`]).
    pub fn next_keepalive(&mut self, now: u64) -> Option<(FlowId, ConnHandle)> {
        loop {
            let &(at, raw) = self.keepalive.first()?;
            if at > now {
                return None;
            }
            self.keepalive.pop_first();
            let id = FlowId::new(raw)?;
            if let Some(Some(o)) = self.owners.get_mut(idx(id)) {
                if o.keepalive_at == at {
                    o.keepalive_at = NOT_SCHEDULED;
                    return Some((id, o.conn));
                }
            }
        }
    }

    fn unschedule(&mut self, id: FlowId) {
        if let Some(Some(o)) = self.owners.get_mut(idx(id)) {
            if o.keepalive_at != NOT_SCHEDULED {
                self.keepalive.remove(&(o.keepalive_at, id.get()));
                o.keepalive_at = NOT_SCHEDULED;
            }
        }
    }

    /// The delete of slot `id` (installed with `generation`) completed with the final
    /// counters `c`: everything not folded yet, the final delta included, and the
    /// owner. The slot is freed.
    pub fn finish(&mut self, id: FlowId, generation: u8, c: &FlowCounters) -> Option<Finished> {
        let i = idx(id);
        let s = self.seen.get_mut(i)?;
        if !s.owned() {
            return None;
        }
        let before = unfolded_of(s, self.owners.get(i).and_then(Option::as_ref));
        if s.generation() != generation {
            // Not the generation we pulled: its counters are all since insert.
            s.set(0, generation, OWNED);
        }
        let last = Delta {
            counts: s.rebase(c),
            last_hit: c.last_hit,
        };
        let owner = self.release(id)?.owner;
        Some(Finished {
            taken: Taken {
                owner,
                unfolded: before.plus(last.counts),
            },
            last,
        })
    }

    /// Frees slot `id`, returning its owner and unfolded counts (to be folded).
    pub fn release(&mut self, id: FlowId) -> Option<Taken> {
        self.unschedule(id);
        let i = idx(id);
        let seen = std::mem::take(self.seen.get_mut(i)?);
        if let Some(h) = self.hits.get_mut(i) {
            *h = NO_HITS;
        }
        let owner = self.owners.get_mut(i)?.take()?;
        let unfolded = unfolded_of(&seen, Some(&owner));
        Some(Taken { owner, unfolded })
    }

    /// Frees slot `id` only if `owner` still owns it; returns what was unfolded.
    pub fn release_if(&mut self, id: FlowId, owner: ConnHandle) -> Option<Taken> {
        if self.get(id).is_some_and(|o| o.conn == owner) {
            self.release(id)
        } else {
            None
        }
    }

    /// Takes the unfolded counts out of slot `id` (zero when not ours); the slot stays
    /// installed.
    pub fn take_unfolded(&mut self, id: FlowId) -> Counts {
        let i = idx(id);
        match (self.seen.get_mut(i), self.owners.get_mut(i)) {
            (Some(s), Some(o)) if s.owned() => take_unfolded_of(s, o.as_mut()),
            _ => Counts::default(),
        }
    }

    /// Takes the unfolded counts out of every owned slot that has some (slot order),
    /// appending them to `out`; the slots stay installed.
    pub fn take_all_unfolded(&mut self, out: &mut Vec<Taken>) {
        for (s, o) in self.seen.iter_mut().zip(&mut self.owners) {
            if !s.owned() {
                continue;
            }
            let Some(owner) = o.as_mut() else {
                continue;
            };
            let unfolded = take_unfolded_of(s, Some(owner));
            if !unfolded.is_zero() {
                out.push(Taken {
                    owner: *owner,
                    unfolded,
                });
            }
        }
    }

    /// Frees every slot (the device table is gone). Unfolded counts are lost: take
    /// them out first ([`Slots::take_all_unfolded`]).
    pub fn reset(&mut self, n: usize) {
        self.seen.clear();
        self.seen.resize(n, Seen::default());
        self.hits.clear();
        self.hits.resize(n, NO_HITS);
        self.owners.clear();
        self.owners.resize(n, None);
        self.idle_floor.clear();
        self.idle_floor.resize(n.div_ceil(IDLE_GROUP), NO_HITS);
        self.keepalive.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctoffload_fallback_sw::table::Slot;

    fn c(packets: u32, bytes: u64, last_hit: u64) -> FlowCounters {
        FlowCounters {
            packets,
            bytes,
            last_hit,
        }
    }

    fn n(packets: u64, bytes: u64) -> Counts {
        Counts { packets, bytes }
    }

    fn sample(id: FlowId, generation: u8, counters: FlowCounters) -> CounterSample {
        CounterSample {
            flow_id: id,
            valid: true,
            generation,
            counters,
        }
    }

    fn moved(o: Observed) -> Counts {
        match o {
            Observed::Moved(d) => d,
            other => panic!("expected a move, got {other:?}"),
        }
    }

    fn conn(slot: u32, id: u64) -> ConnHandle {
        ConnHandle {
            slot: Slot(slot),
            id,
        }
    }

    #[test]
    fn deltas_since_insert_then_wrap_safe_kept_unfolded() {
        let h = conn(1, 7);
        let id = FlowId::new(3).expect("id");
        let mut t = Slots::new(8);
        t.install(id, (h, Dir::Reply), 5, 0, 14);
        // First pull: everything since insert, even zero.
        assert_eq!(moved(t.observe(&sample(id, 5, c(0, 0, 0)))), n(0, 0));
        assert_eq!(
            moved(t.observe(&sample(id, 5, c(10, 1000, 9)))),
            n(10, 1000)
        );
        assert_eq!(
            t.observe(&sample(id, 5, c(10, 1000, 9))),
            Observed::Unchanged { last_hit: 9 }
        );
        assert_eq!(t.last_hit(id), 9);
        assert_eq!(t.unfolded(id), n(10, 1000));
        // Another generation or an empty slot is not ours.
        assert_eq!(t.observe(&sample(id, 6, c(1, 1, 1))), Observed::NotOurs);
        let mut empty = sample(id, 5, c(1, 1, 1));
        empty.valid = false;
        assert_eq!(t.observe(&empty), Observed::NotOurs);
        // A move of more than 64 KiB a packet (here to the edge of both raw counters)
        // is folded at once, with everything unfolded before it.
        match t.observe(&sample(id, 5, c(u32::MAX - 1, BYTE_COUNTER_MASK - 9, 10))) {
            Observed::MovedFoldNow { delta, unfolded } => {
                assert_eq!(delta, n(u64::from(u32::MAX) - 11, BYTE_COUNTER_MASK - 1009));
                assert_eq!(unfolded, n(u64::from(u32::MAX) - 1, BYTE_COUNTER_MASK - 9));
            }
            other => panic!("expected a fold, got {other:?}"),
        }
        assert_eq!(t.unfolded(id), n(0, 0));
        // Wrap of both counters: the unfolded bytes count across the raw wrap.
        let d = moved(t.observe(&sample(id, 5, c(3, 20, 11))));
        assert_eq!(d, n(5, 30));
        assert_eq!(t.last_hit(id), 11);
        assert_eq!(t.unfolded(id), n(5, 30));
        // The delete's final counters: everything unfolded plus the last delta.
        let f = t.finish(id, 5, &c(4, 25, 12)).expect("ours");
        assert_eq!(f.last.counts, n(1, 5));
        assert_eq!(f.taken.unfolded, n(6, 35));
        assert_eq!(f.taken.owner.conn, h);
        assert!(t.owner(id).is_none());
        assert_eq!(t.unfolded(id), n(0, 0));
        assert_eq!(t.observe(&sample(id, 5, c(9, 9, 9))), Observed::NotOurs);
        // A finish for a generation never pulled: everything since insert.
        t.install(id, (h, Dir::Original), 6, 0, 14);
        let f = t.finish(id, 6, &c(2, 200, 1)).expect("ours");
        assert_eq!(f.taken.unfolded, n(2, 200));
        assert!(t.finish(id, 6, &c(2, 200, 1)).is_none(), "freed");
    }

    #[test]
    fn unfolded_counts_never_overflow() {
        let h = conn(1, 7);
        let id = FlowId::new(2).expect("id");
        let mut t = Slots::new(4);
        t.install(id, (h, Dir::Original), 1, 0, 14);
        let big = u32::MAX - 5;
        assert_eq!(
            moved(t.observe(&sample(id, 1, c(big, 100, 1)))).packets,
            u64::from(big)
        );
        // Ten more packets wrap the raw counter and would overflow the unfolded count:
        // everything is handed out to be folded now.
        match t.observe(&sample(id, 1, c(4, 200, 2))) {
            Observed::MovedFoldNow { delta, unfolded } => {
                assert_eq!(delta, n(10, 100));
                assert_eq!(unfolded, n(u64::from(big) + 10, 200));
            }
            other => panic!("expected a fold, got {other:?}"),
        }
        assert_eq!(t.unfolded(id), n(0, 0));
        assert_eq!(moved(t.observe(&sample(id, 1, c(6, 300, 3)))), n(2, 100));
        assert_eq!(t.unfolded(id), n(2, 100));
        // More than 64 KiB a packet: folded at once (the unfolded bytes, kept as the
        // raw counter minus its value at the last fold, stay below 2^48).
        let bytes = 300 + (3 << MAX_BYTES_PER_PACKET_SHIFT) + 1;
        match t.observe(&sample(id, 1, c(9, bytes, 4))) {
            Observed::MovedFoldNow { delta, unfolded } => {
                assert_eq!(delta, n(3, bytes - 300));
                assert_eq!(unfolded, n(5, bytes - 200));
            }
            other => panic!("expected a fold, got {other:?}"),
        }
        assert_eq!(t.unfolded(id), n(0, 0));
        // Exactly 64 KiB a packet is kept.
        let more = bytes + (1 << MAX_BYTES_PER_PACKET_SHIFT);
        assert_eq!(
            moved(t.observe(&sample(id, 1, c(10, more, 5)))),
            n(1, more - bytes)
        );
        assert_eq!(t.unfolded(id), n(1, more - bytes));
    }

    #[test]
    fn take_all_and_release_leave_nothing_unfolded() {
        let (a, b) = (FlowId::new(1).expect("a"), FlowId::new(6).expect("b"));
        let other = conn(2, 8);
        let mut t = Slots::new(8);
        t.install(a, (conn(1, 7), Dir::Original), 1, 0, 14);
        t.install(b, (other, Dir::Reply), 1, 0, 18);
        t.observe(&sample(a, 1, c(3, 300, 1)));
        t.observe(&sample(b, 1, c(0, 0, 0)));
        let mut out = Vec::new();
        t.take_all_unfolded(&mut out);
        assert_eq!(out.len(), 1, "only slots with something unfolded");
        assert_eq!(
            (out[0].owner.conn, out[0].unfolded),
            (conn(1, 7), n(3, 300))
        );
        assert_eq!(t.unfolded(a), n(0, 0));
        // The baseline stays: the next pull counts only what is new.
        assert_eq!(moved(t.observe(&sample(a, 1, c(4, 400, 2)))), n(1, 100));
        assert!(t.release_if(a, other).is_none());
        let r = t.release_if(a, conn(1, 7)).expect("owned");
        assert_eq!(r.unfolded, n(1, 100));
        assert!(t.owner(a).is_none());
        assert!(t.release(a).is_none());
    }

    /// Slots 0-8 installed at agent time 0 (7 is not ours), hit at `hits` (0: never).
    fn idle_table(hits: &[u64; 9]) -> Slots {
        let mut t = Slots::new(9);
        for (i, &raw) in hits.iter().enumerate() {
            if i == 7 {
                continue;
            }
            let id = FlowId::new(u32::try_from(i).expect("i")).expect("id");
            t.install(id, (conn(1, 7), Dir::Original), 1, 0, 14);
            if raw != 0 {
                t.observe(&sample(id, 1, c(1, 64, raw)));
            }
        }
        t
    }

    #[test]
    fn idle_candidates_are_the_slots_idle_longer_than_min_idle() {
        // Raw last hits of slots 1-8: never hit, early, around the limits, late; slot
        // 7 not ours.
        let hits = [0u64, 0, 1, 999, 1000, 1001, 5000, 0, u64::MAX - 1];
        // The definition, slot by slot (installed at 0).
        let idle = |raw: u64, now: u64, min_idle: u64, offset: i64| {
            let hw = if raw == 0 {
                0
            } else {
                raw.saturating_add_signed(offset)
            };
            (now.saturating_sub(hw) > min_idle).then_some(hw)
        };
        let mut out = Vec::new();
        for offset in [0, 1, -1, 1000, -1000, i64::MAX, i64::MIN] {
            // The device time offset is fixed for a table's life.
            let mut t = idle_table(&hits);
            for now in [0, 500, 1000, 2000, 6000, 20_000, u64::MAX] {
                for min_idle in [0, 999, 1000, 1001, 4000, u64::MAX] {
                    out.clear();
                    t.idle_candidates(1..9, now, min_idle, offset, &mut out);
                    let want: Vec<_> = (1..9)
                        .filter(|&i| i != 7)
                        .filter_map(|i| {
                            let raw = hits.get(i).copied().unwrap_or(0);
                            let id = FlowId::new(u32::try_from(i).ok()?)?;
                            idle(raw, now, min_idle, offset).map(|hw| (id, hw))
                        })
                        .collect();
                    assert_eq!(out, want, "now {now} min_idle {min_idle} offset {offset}");
                }
            }
        }
        let mut t = idle_table(&hits);
        out.clear();
        t.idle_candidates(0..100, 20_000, 0, 0, &mut out);
        assert!(out.is_empty(), "a range past the table is not read");
        t.idle_candidates(6..9, 20_000, 0, 0, &mut out);
        assert_eq!(
            out.len(),
            1,
            "slot 6 (5000) only: 7 is not ours, 8 is in the future"
        );
        // A slot never hit is idle from its install time on.
        let seven = FlowId::new(7).expect("id");
        t.install(seven, (conn(2, 8), Dir::Reply), 1, 15_000, 14);
        out.clear();
        t.idle_candidates(7..8, 20_000, 6000, 0, &mut out);
        assert!(out.is_empty(), "installed 5000 ago");
        t.idle_candidates(7..8, 20_000, 4000, 0, &mut out);
        assert_eq!(out, [(seven, 0)]);
        // After a scan the group's floor is its earliest hit (100): a move to an
        // earlier hit lowers it, so that the slot is still found.
        let mut t = Slots::new(4);
        let (one, two) = (FlowId::new(1).expect("id"), FlowId::new(2).expect("id"));
        t.install(one, (conn(1, 7), Dir::Original), 1, 0, 14);
        t.install(two, (conn(1, 7), Dir::Reply), 1, 0, 14);
        t.observe(&sample(one, 1, c(1, 64, 100)));
        t.observe(&sample(two, 1, c(1, 64, 200)));
        out.clear();
        t.idle_candidates(0..4, 150, 0, 0, &mut out);
        assert_eq!(out, [(one, 100)]);
        out.clear();
        t.idle_candidates(0..4, 50, 0, 0, &mut out);
        assert!(out.is_empty(), "nothing before 50");
        t.observe(&sample(two, 1, c(2, 128, 10)));
        t.idle_candidates(0..4, 50, 0, 0, &mut out);
        assert_eq!(out, [(two, 10)], "its last hit went back to 10");
    }

    #[test]
    fn keepalive_schedule_follows_owners() {
        let h = conn(1, 7);
        let (a, b) = (FlowId::new(1).expect("a"), FlowId::new(6).expect("b"));
        let mut t = Slots::new(8);
        t.install(a, (h, Dir::Original), 1, 100, 14);
        t.install(b, (h, Dir::Reply), 1, 100, 14);
        assert!(t.next_keepalive(u64::MAX).is_none(), "not offloaded yet");
        t.pair(a, b);
        assert_eq!(t.get(a).and_then(Owner::partner), Some(b));
        assert_eq!(t.get(b).and_then(Owner::partner), Some(a));
        let due = 100 + FIRST_KEEPALIVE_NS;
        assert!(t.next_keepalive(due - 1).is_none());
        assert_eq!(t.next_keepalive(due), Some((a, h)));
        assert!(t.next_keepalive(u64::MAX).is_none(), "taken");
        t.schedule_keepalive(a, 500);
        t.schedule_keepalive(a, 700);
        assert!(t.next_keepalive(600).is_none(), "rescheduled, not twice");
        // A freed slot's schedule goes with it; a new owner starts unscheduled.
        t.release(a);
        assert!(t.next_keepalive(u64::MAX).is_none());
        t.install(a, (conn(3, 9), Dir::Original), 2, 0, 14);
        t.schedule_keepalive(a, 10);
        t.install(a, (conn(4, 10), Dir::Original), 3, 0, 14);
        assert!(t.next_keepalive(u64::MAX).is_none());
        assert!(t.get(FlowId::new(100).expect("id")).is_none());
    }
}
