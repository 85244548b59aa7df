//! The device's flow table (device.md section 10) and per-slot counters (section 11).
//!
//! `2^buckets_log2` buckets of [`WAYS`] slots; a key lives in bucket
//! `crc32c(key) & (B - 1)` and takes the lowest free way. Keys, validity and counters
//! are kept in separate dense arrays so that a datapath lookup touches one bucket's keys
//! only. The table holds decoded actions next to the raw action block, so that the
//! datapath never decodes an action per packet.
//!
//! This module holds state only; command validation and completion codes live in
//! [`crate::device`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctoffload_hw_regs::limits::BYTE_COUNTER_MASK;
use ctoffload_hw_regs::{ActionFlags, FlowAction, FlowCounters, FlowKey, KeyKind};

use crate::rewrite::RewriteParams;

/// Slots per bucket (always 8 in version 1.x).
pub const WAYS: u32 = 8;

/// CRC-32C (Castagnoli). Same function as `ctoffload_hw_regs::crc32c` (pinned by a
/// test): the SSE4.2 `crc32` instruction where the CPU has it (six instructions for a
/// 48-byte key), else slicing-by-8 (about six times faster than bytewise).
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE4.2 (checked just above), the only requirement
        // of a `#[target_feature(enable = "sse4.2")]` function.
        return unsafe { crc32c_sse42(data) };
    }
    crc32c_sliced(data)
}

/// [`crc32c`] with the SSE4.2 `crc32` instruction, 8 bytes at a time.
///
/// # Safety
/// The CPU must support SSE4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    let mut crc = u64::from(0xFFFF_FFFF_u32);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(w));
    }
    let mut crc = u32::try_from(crc).unwrap_or(0);
    for &byte in chunks.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    !crc
}

/// [`crc32c`], slicing-by-8 (any CPU).
fn crc32c_sliced(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFF_u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        let [a, b, cc, d] = lo.to_le_bytes();
        let [e, f, g, h] = hi.to_le_bytes();
        crc = SLICES[7][usize::from(a)]
            ^ SLICES[6][usize::from(b)]
            ^ SLICES[5][usize::from(cc)]
            ^ SLICES[4][usize::from(d)]
            ^ SLICES[3][usize::from(e)]
            ^ SLICES[2][usize::from(f)]
            ^ SLICES[1][usize::from(g)]
            ^ SLICES[0][usize::from(h)];
    }
    for &byte in chunks.remainder() {
        let index = (crc ^ u32::from(byte)).to_le_bytes()[0];
        crc = (crc >> 8) ^ SLICES[0][usize::from(index)];
    }
    !crc
}

const SLICES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0u32;
    while i < 256 {
        let mut crc = i;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        t[0][i as usize] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0usize;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

/// An installed entry's action, decoded once at insert/modify time.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// The action block as the driver wrote it (for `TABLE_DUMP`).
    pub raw: FlowAction,
    /// Its flags.
    pub flags: ActionFlags,
    /// Egress port.
    pub out_port: u8,
    /// The rewrite the action performs.
    pub params: RewriteParams,
}

impl Entry {
    /// Decodes a (validated) action for a key of `kind`.
    pub fn decode(raw: FlowAction, kind: KeyKind) -> Self {
        let flags = ActionFlags::from_bits_retain(raw.flags.get());
        let addr = |b: [u8; 16]| match kind {
            KeyKind::Ipv4 => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            KeyKind::Ipv6 => IpAddr::V6(Ipv6Addr::from(b)),
        };
        let params = RewriteParams {
            src_mac: flags
                .contains(ActionFlags::REWRITE_SRC_MAC)
                .then_some(raw.new_src_mac),
            dst_mac: flags
                .contains(ActionFlags::REWRITE_DST_MAC)
                .then_some(raw.new_dst_mac),
            dec_ttl: flags.contains(ActionFlags::DEC_TTL),
            new_src: flags
                .contains(ActionFlags::SNAT)
                .then(|| (addr(raw.new_src_addr), raw.new_src_port.get())),
            new_dst: flags
                .contains(ActionFlags::DNAT)
                .then(|| (addr(raw.new_dst_addr), raw.new_dst_port.get())),
        };
        Self {
            raw,
            flags,
            out_port: raw.out_port,
            params,
        }
    }
}

/// A 48-byte key image and its bucket in the table that hashed it
/// ([`FlowTable::hash`]); the table's geometry never changes, so it stays valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashedKey {
    image: [u8; 48],
    bucket: u32,
}

impl HashedKey {
    /// The key image.
    pub fn image(&self) -> &[u8; 48] {
        &self.image
    }
}

/// `SlotMeta::entry` of a slot without an entry.
const NO_ENTRY: u32 = u32::MAX;

/// A slot's counters and action index, as [`MetaArray`] stores them.
#[derive(Debug, Clone, Copy)]
struct SlotMeta {
    bytes: u64,
    last_hit: u64,
    packets: u32,
    /// Index of the decoded action in `FlowTable::pool`, or [`NO_ENTRY`].
    entry: u32,
}

impl SlotMeta {
    const EMPTY: Self = Self {
        bytes: 0,
        last_hit: 0,
        packets: 0,
        entry: NO_ENTRY,
    };
}

/// Words per slot in [`MetaArray`] (three used; the fourth pads the record to 32 bytes
/// so that none straddles a cache line).
const META_WORDS: usize = 4;

/// The per-slot records: four 64-bit words a slot (bytes, last hit, packets and action
/// index, unused), 32-byte aligned so that a record sits in one cache line, and
/// all-zero when empty. Being plain zeroed words, the array is allocated zeroed: no page
/// is touched until a slot is used, so creating or resetting a large table is cheap
/// (a reset must complete within the device's reset time).
#[derive(Debug)]
struct MetaArray {
    words: Vec<u64>,
    /// First word of slot 0 (0 to 3): where the vector's memory is 32-byte aligned.
    off: usize,
}

impl MetaArray {
    fn new(slots: usize) -> Self {
        let words = vec![0u64; slots * META_WORDS + META_WORDS - 1];
        // The allocation is 8-byte aligned; skip 0 to 3 words to reach 32.
        let misalign = words.as_ptr().addr() % 32;
        let off = (32 - misalign) % 32 / 8;
        Self { words, off }
    }

    #[inline]
    fn range(&self, slot: u32) -> std::ops::Range<usize> {
        let i = self.off + idx(slot) * META_WORDS;
        i..i + META_WORDS
    }

    #[inline]
    fn get(&self, slot: u32) -> Option<SlotMeta> {
        let w = self.words.get(self.range(slot))?;
        let hi = u32::try_from(w[2] >> 32).unwrap_or(0);
        Some(SlotMeta {
            bytes: w[0],
            last_hit: w[1],
            packets: u32::try_from(w[2] & 0xFFFF_FFFF).unwrap_or(0),
            // Stored as index + 1, so that an all-zero record has no entry.
            entry: hi.checked_sub(1).unwrap_or(NO_ENTRY),
        })
    }

    #[inline]
    fn set(&mut self, slot: u32, m: SlotMeta) {
        let range = self.range(slot);
        if let Some(w) = self.words.get_mut(range) {
            let entry = if m.entry == NO_ENTRY { 0 } else { m.entry + 1 };
            w[0] = m.bytes;
            w[1] = m.last_hit;
            w[2] = u64::from(entry) << 32 | u64::from(m.packets);
            w[3] = 0;
        }
    }

    /// Applies `f` to the record of `slot` (nothing for a slot out of range).
    #[inline]
    fn update(&mut self, slot: u32, f: impl FnOnce(&mut SlotMeta)) {
        if let Some(mut m) = self.get(slot) {
            f(&mut m);
            self.set(slot, m);
        }
    }
}

/// Outcome of [`FlowTable::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Installed in this slot with this generation.
    Installed {
        /// Slot.
        slot: u32,
        /// New generation.
        generation: u8,
    },
    /// The key is installed already, in this slot.
    Exists {
        /// Slot.
        slot: u32,
        /// Its generation.
        generation: u8,
    },
    /// `FLOW_COUNT` has reached the limit.
    TableFull,
    /// The key's bucket has no free way.
    BucketFull,
}

/// The flow table.
#[derive(Debug)]
pub struct FlowTable {
    buckets_log2: u8,
    /// 48-byte key images, one per slot.
    keys: Vec<[u8; 48]>,
    /// Bit `w` set: way `w` of the bucket is occupied.
    valid: Vec<u8>,
    /// Per-slot counters and action index: one 32-byte record, so a delete or a
    /// datapath hit touches one cache line of it (not one per field); an insert only
    /// writes it.
    meta: MetaArray,
    /// Per-slot generation, one byte a slot (kept apart from `meta`: an insert needs
    /// the generation of the way it takes; a bucket's eight share one 8-byte word, and
    /// the array is 1/32 of the records' size, so it mostly stays in cache and an insert
    /// into a free way reads nothing from the large arrays).
    generations: Vec<u8>,
    /// Decoded actions of installed entries (a slab: no allocation per insert once it
    /// has grown to the table's high-water mark).
    pool: Vec<Entry>,
    /// Free indices in `pool`.
    free: Vec<u32>,
    count: u32,
}

impl FlowTable {
    /// An empty table of `2^buckets_log2 × 8` slots.
    pub fn new(buckets_log2: u8) -> Self {
        let buckets = 1usize << buckets_log2;
        let slots = buckets * 8;
        Self {
            buckets_log2,
            keys: vec![[0u8; 48]; slots],
            valid: vec![0; buckets],
            meta: MetaArray::new(slots),
            generations: vec![0; slots],
            pool: Vec::new(),
            free: Vec::new(),
            count: 0,
        }
    }

    /// Empties the table: no entry, generations and counters 0.
    pub fn clear(&mut self) {
        *self = Self::new(self.buckets_log2);
    }

    /// Slots in the table.
    pub fn capacity(&self) -> u32 {
        u32::try_from(self.keys.len()).unwrap_or(u32::MAX)
    }

    /// Installed entries.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The bucket of a 48-byte key image.
    #[inline]
    pub fn bucket_of(&self, key: &[u8; 48]) -> u32 {
        crc32c(key) & ((1u32 << self.buckets_log2) - 1)
    }

    /// The slot holding `key`, if any (searches the key's bucket only).
    #[inline]
    pub fn lookup(&self, key: &[u8; 48]) -> Option<u32> {
        self.lookup_in(self.bucket_of(key), key)
    }

    /// Hashes a key image once, for [`warm`](Self::warm) and the `*_hashed` methods.
    #[inline]
    pub fn hash(&self, key: &[u8; 48]) -> HashedKey {
        HashedKey {
            image: *key,
            bucket: self.bucket_of(key),
        }
    }

    /// Reads the first cache lines of the key's bucket (validity byte, way 0's key and
    /// record) so that a datapath lookup and hit that follow find them in cache. Called
    /// for a group of keys in a row, the cache misses of the group overlap instead of
    /// being paid one after another (the crate has no prefetch instruction: plain loads
    /// do the job).
    #[inline]
    pub fn warm(&self, key: &HashedKey) {
        let v = self.valid.get(idx(key.bucket)).copied().unwrap_or(0);
        std::hint::black_box(v ^ self.touch_ways(key.bucket, 1, true));
    }

    /// [`warm`](Self::warm) for a flow command: the bucket's validity byte and
    /// generations, key and record of every occupied way (a lookup compares the keys, a
    /// delete or query reads the counters) and of the lowest free way, which an insert
    /// writes (a store to a line not in cache stalls the insert as a load would).
    #[inline]
    pub fn warm_for_command(&self, key: &HashedKey) {
        let b = idx(key.bucket);
        let valid = self.valid.get(b).copied().unwrap_or(0);
        let free = !valid;
        let ways = valid | (free & free.wrapping_neg());
        let g = self.generations.get(b.saturating_mul(idx(WAYS))).copied();
        std::hint::black_box(self.touch_ways(key.bucket, ways, true) ^ g.unwrap_or(0));
    }

    /// Loads the key (and, with `records`, the record) of every way of `bucket` set in
    /// `ways`; returns a value made from them, for `black_box`.
    #[inline]
    fn touch_ways(&self, bucket: u32, mut ways: u8, records: bool) -> u8 {
        let mut x = 0;
        while ways != 0 {
            let slot = bucket
                .wrapping_mul(WAYS)
                .wrapping_add(ways.trailing_zeros());
            ways &= ways - 1;
            x ^= self.keys.get(idx(slot)).map_or(0, |k| k[0] ^ k[47]);
            if records {
                x ^= self
                    .meta
                    .get(slot)
                    .map_or(0, |m| m.packets.to_le_bytes()[0]);
            }
        }
        x
    }

    /// Reads an installed slot's record and decoded action (see [`warm`](Self::warm)),
    /// ahead of a datapath hit on it.
    #[inline]
    pub fn warm_slot(&self, slot: u32) {
        let Some(m) = self.meta.get(slot) else {
            return;
        };
        let f = self.pool.get(idx(m.entry)).map_or(0, |e| e.out_port);
        std::hint::black_box(f ^ u8::from(m.packets == 0));
    }

    /// [`lookup`](Self::lookup) of a hashed key.
    #[inline]
    pub fn lookup_hashed(&self, key: &HashedKey) -> Option<u32> {
        self.lookup_in(key.bucket, &key.image)
    }

    /// The slot of `bucket` holding `key`, if any.
    #[inline]
    fn lookup_in(&self, bucket: u32, key: &[u8; 48]) -> Option<u32> {
        let b = usize::try_from(bucket).ok()?;
        let mut valid = *self.valid.get(b)?;
        while valid != 0 {
            let way = valid.trailing_zeros();
            valid &= valid - 1;
            let slot = bucket * WAYS + way;
            let s = usize::try_from(slot).ok()?;
            if self.keys.get(s).is_some_and(|k| key_eq(k, key)) {
                return Some(slot);
            }
        }
        None
    }

    /// Inserts `key` with `entry` unless it exists, the table holds `limit` entries, or
    /// its bucket is full (checked in that order, device.md section 6.2).
    pub fn insert(&mut self, key: &[u8; 48], entry: Entry, limit: u32) -> InsertOutcome {
        let key = self.hash(key);
        self.insert_hashed(&key, entry, limit)
    }

    /// [`insert`](Self::insert) of a hashed key: one CRC per insert, the bucket serves
    /// the duplicate check and the placement.
    pub fn insert_hashed(&mut self, key: &HashedKey, entry: Entry, limit: u32) -> InsertOutcome {
        let bucket = key.bucket;
        let key = &key.image;
        if let Some(slot) = self.lookup_in(bucket, key) {
            return InsertOutcome::Exists {
                slot,
                generation: self.generation_of(slot),
            };
        }
        if self.count >= limit {
            return InsertOutcome::TableFull;
        }
        let Ok(b) = usize::try_from(bucket) else {
            return InsertOutcome::BucketFull;
        };
        let free = !self.valid[b];
        if free == 0 {
            return InsertOutcome::BucketFull;
        }
        let way = free.trailing_zeros();
        self.valid[b] |= 1 << way;
        let slot = bucket * WAYS + way;
        let s = idx(slot);
        self.keys[s] = *key;
        let e = self.alloc_entry(entry);
        let generation = self.generations[s].wrapping_add(1);
        self.generations[s] = generation;
        self.meta.set(
            slot,
            SlotMeta {
                entry: e,
                ..SlotMeta::EMPTY
            },
        );
        self.count += 1;
        InsertOutcome::Installed { slot, generation }
    }

    /// Whether `slot` holds exactly `key`.
    pub fn holds(&self, slot: u32, key: &[u8; 48]) -> bool {
        self.is_valid(slot) && self.keys.get(idx(slot)).is_some_and(|k| key_eq(k, key))
    }

    /// Whether an entry is installed in `slot`.
    pub fn is_valid(&self, slot: u32) -> bool {
        let way = slot % WAYS;
        self.valid
            .get(idx(slot / WAYS))
            .is_some_and(|v| v & (1 << way) != 0)
    }

    /// Removes the entry in `slot` and returns its final counters.
    pub fn remove(&mut self, slot: u32) -> FlowCounters {
        let c = self.counters(slot);
        let s = idx(slot);
        self.valid[idx(slot / WAYS)] &= !(1 << (slot % WAYS));
        let e = self.meta.get(slot).map_or(NO_ENTRY, |m| m.entry);
        self.meta.set(slot, SlotMeta::EMPTY);
        if e != NO_ENTRY {
            self.free.push(e);
        }
        self.keys[s] = [0; 48];
        self.count -= 1;
        c
    }

    /// Replaces the action of `slot`.
    pub fn modify(&mut self, slot: u32, entry: Entry) {
        match self.meta.get(slot).map(|m| m.entry) {
            Some(NO_ENTRY) => {
                let e = self.alloc_entry(entry);
                self.meta.update(slot, |m| m.entry = e);
            }
            Some(e) => {
                if let Some(p) = self.pool.get_mut(idx(e)) {
                    *p = entry;
                }
            }
            None => {}
        }
    }

    /// Stores `entry` in a free pool cell and returns its index.
    fn alloc_entry(&mut self, entry: Entry) -> u32 {
        if let Some(e) = self.free.pop() {
            if let Some(p) = self.pool.get_mut(idx(e)) {
                *p = entry;
                return e;
            }
        }
        // The pool never holds more cells than the table has slots (< 2^24).
        let e = u32::try_from(self.pool.len()).unwrap_or(NO_ENTRY);
        self.pool.push(entry);
        e
    }

    /// The slot's generation.
    pub fn generation_of(&self, slot: u32) -> u8 {
        self.generations.get(idx(slot)).copied().unwrap_or(0)
    }

    /// The slot's counters (0 for an empty slot).
    pub fn counters(&self, slot: u32) -> FlowCounters {
        self.meta
            .get(slot)
            .map_or(FlowCounters::default(), |m| FlowCounters {
                packets: m.packets,
                bytes: m.bytes,
                last_hit: m.last_hit,
            })
    }

    /// The slot's key and action, if installed.
    pub fn entry(&self, slot: u32) -> Option<(&[u8; 48], &Entry)> {
        let s = idx(slot);
        let e = self.pool.get(idx(self.meta.get(slot)?.entry))?;
        Some((self.keys.get(s)?, e))
    }

    /// Counts one hit of `len` bytes at `now` on `slot`.
    #[inline]
    pub fn count_hit(&mut self, slot: u32, len: usize, now: u64) {
        let len = u64::try_from(len).unwrap_or(0);
        self.meta.update(slot, |m| {
            m.packets = m.packets.wrapping_add(1);
            m.bytes = m.bytes.wrapping_add(len) & BYTE_COUNTER_MASK;
            m.last_hit = now.max(1);
        });
    }

    /// Sets the counters of an installed slot (fault injection: counter wrap).
    pub fn preload(&mut self, slot: u32, packets: u32, bytes: u64) -> bool {
        if !self.is_valid(slot) {
            return false;
        }
        self.meta.update(slot, |m| {
            m.packets = packets;
            m.bytes = bytes & BYTE_COUNTER_MASK;
        });
        true
    }

    /// The decoded action of `slot` (datapath).
    #[inline]
    pub fn action(&self, slot: u32) -> Option<&Entry> {
        self.pool.get(idx(self.meta.get(slot)?.entry))
    }
}

/// 48-byte key equality in three 16-byte words (no `memcmp` call on the hot path).
#[inline]
fn key_eq(a: &[u8; 48], b: &[u8; 48]) -> bool {
    let w = |k: &[u8; 48], i: usize| {
        let mut x = [0u8; 16];
        x.copy_from_slice(&k[i * 16..i * 16 + 16]);
        u128::from_ne_bytes(x)
    };
    (w(a, 0) ^ w(b, 0)) | (w(a, 1) ^ w(b, 1)) | (w(a, 2) ^ w(b, 2)) == 0
}

#[inline]
fn idx(v: u32) -> usize {
    // u32 always fits usize on the 64-bit hosts this crate supports.
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// The 48-byte image of a key.
pub fn key_image(key: &FlowKey) -> [u8; 48] {
    key.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn crc_matches_hw_regs(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            prop_assert_eq!(crc32c(&data), ctoffload_hw_regs::crc32c(&data));
            prop_assert_eq!(crc32c_sliced(&data), ctoffload_hw_regs::crc32c(&data));
        }
    }

    #[test]
    fn crc_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn actions_follow_their_slot_through_remove_reinsert_and_modify() {
        let mut t = FlowTable::new(2);
        let act = |port| Entry::decode(FlowAction::forward(port), KeyKind::Ipv4);
        let keys: Vec<[u8; 48]> = (0u8..20).map(|i| [i + 1; 48]).collect();
        let mut slots = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let port = u8::try_from(i % 8).expect("small");
            match t.insert(k, act(port), 100) {
                InsertOutcome::Installed { slot, .. } => slots.push(slot),
                other => panic!("{other:?}"),
            }
        }
        // Free every other entry, put new keys in, change one action.
        for &s in slots.iter().step_by(2) {
            t.remove(s);
            assert!(t.action(s).is_none());
            assert!(t.entry(s).is_none());
            assert_eq!(t.counters(s), FlowCounters::default());
        }
        let fresh: Vec<[u8; 48]> = (100u8..110).map(|i| [i; 48]).collect();
        for k in &fresh {
            assert!(matches!(
                t.insert(k, act(7), 100),
                InsertOutcome::Installed { .. }
            ));
        }
        t.modify(slots[1], act(3));
        assert_eq!(t.count(), 20);
        for (i, (k, &s)) in keys.iter().zip(&slots).enumerate() {
            if i % 2 == 1 {
                let want = if i == 1 {
                    3
                } else {
                    u8::try_from(i % 8).expect("small")
                };
                assert_eq!(t.lookup(k), Some(s));
                assert_eq!(t.action(s).map(|e| e.out_port), Some(want));
                assert_eq!(t.entry(s).map(|(key, _)| *key), Some(*k));
            }
        }
        for k in &fresh {
            let s = t.lookup(k).expect("installed");
            assert_eq!(t.action(s).map(|e| e.out_port), Some(7));
        }
        // A hashed key finds the same slot as the plain one.
        let h = t.hash(&fresh[0]);
        assert_eq!(t.lookup_hashed(&h), t.lookup(&fresh[0]));
        assert_eq!(h.image(), &fresh[0]);
    }

    #[test]
    fn slot_records_are_aligned_empty_when_zero_and_round_trip() {
        for slots in [8, 24, 4096] {
            let mut m = MetaArray::new(slots);
            for slot in [0, 1, u32::try_from(slots - 1).expect("small")] {
                let r = m.range(slot);
                assert_eq!(m.words[r.clone()].as_ptr().addr() % 32, 0);
                let e = m.get(slot).expect("in range");
                assert_eq!(e.entry, NO_ENTRY);
                assert_eq!((e.bytes, e.last_hit, e.packets), (0, 0, 0));
                let full = SlotMeta {
                    bytes: BYTE_COUNTER_MASK,
                    last_hit: u64::MAX,
                    packets: u32::MAX,
                    entry: 0x7F_FFFE,
                };
                m.set(slot, full);
                let back = m.get(slot).expect("in range");
                assert_eq!(
                    (back.bytes, back.last_hit, back.packets, back.entry),
                    (BYTE_COUNTER_MASK, u64::MAX, u32::MAX, 0x7F_FFFE)
                );
                m.set(slot, SlotMeta::EMPTY);
                assert!(m.words[r].iter().all(|&w| w == 0));
            }
            assert!(m.get(u32::try_from(slots).expect("small")).is_none());
        }
    }

    #[test]
    fn lowest_free_way_and_generation() {
        let mut t = FlowTable::new(0);
        let entry = Entry::decode(FlowAction::forward(0), KeyKind::Ipv4);
        let keys: Vec<[u8; 48]> = (0u8..9).map(|i| [i + 1; 48]).collect();
        for (i, k) in keys.iter().take(8).enumerate() {
            let want = u32::try_from(i).expect("small");
            assert_eq!(
                t.insert(k, entry, 100),
                InsertOutcome::Installed {
                    slot: want,
                    generation: 1
                }
            );
        }
        assert_eq!(t.insert(&keys[8], entry, 100), InsertOutcome::BucketFull);
        assert_eq!(t.insert(&keys[8], entry, 8), InsertOutcome::TableFull);
        t.remove(3);
        assert_eq!(
            t.insert(&keys[8], entry, 100),
            InsertOutcome::Installed {
                slot: 3,
                generation: 2
            }
        );
        assert_eq!(
            t.insert(&keys[0], entry, 100),
            InsertOutcome::Exists {
                slot: 0,
                generation: 1
            }
        );
    }
}
