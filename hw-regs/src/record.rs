//! Counter and table dump records (device.md sections 11 and 12).

use core::mem::offset_of;

use bitflags::bitflags;

use crate::le::{Le32, Le64, put, take};
use crate::{FlowAction, FlowId, FlowKey};

bitflags! {
    /// Flags word of counter and table records (bits 15:8 hold the generation, see
    /// [`RecordFlags::GENERATION_SHIFT`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RecordFlags: u32 {
        /// An entry is installed in the slot.
        const VALID = 1 << 0;
    }
}

impl RecordFlags {
    /// Position of the 8-bit generation in the flags word.
    pub const GENERATION_SHIFT: u32 = 8;
    /// Mask of the generation in the flags word.
    pub const GENERATION_MASK: u32 = 0xFF << Self::GENERATION_SHIFT;

    /// The raw flags word for a slot.
    #[must_use]
    pub fn encode(valid: bool, generation: u8) -> u32 {
        let valid = if valid { Self::VALID.bits() } else { 0 };
        valid | (u32::from(generation) << Self::GENERATION_SHIFT)
    }

    /// The generation field of a raw flags word.
    #[must_use]
    pub fn generation(raw: u32) -> u8 {
        raw.to_le_bytes()[1]
    }
}

/// The counters of one flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowCounters {
    /// Packets, 32 bits, wraps at 2^32.
    pub packets: u32,
    /// Bytes (L2 frame length as received, without FCS), 48 bits, wraps at 2^48.
    pub bytes: u64,
    /// `TIMESTAMP` of the last counted hit; 0 = never.
    pub last_hit: u64,
}

/// A 32-byte counter record, written by `COUNTER_DUMP`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CounterRecord {
    /// Bytes 0–3: slot.
    pub flow_id: Le32,
    /// Bytes 4–7: [`RecordFlags`] and generation.
    pub flags: Le32,
    /// Bytes 8–11: packets.
    pub packets: Le32,
    /// Bytes 12–15: reserved, zero.
    pub reserved: Le32,
    /// Bytes 16–23: bytes (bits 47:0).
    pub bytes: Le64,
    /// Bytes 24–31: last hit.
    pub last_hit: Le64,
}

/// A 128-byte table record, written by `TABLE_DUMP`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TableDumpRecord {
    /// Bytes 0–3: slot.
    pub flow_id: Le32,
    /// Bytes 4–7: [`RecordFlags`] and generation.
    pub flags: Le32,
    /// Bytes 8–15: reserved, zero.
    pub reserved: [u8; 8],
    /// Bytes 16–63: key (zero if not valid).
    pub key: FlowKey,
    /// Bytes 64–127: action (zero if not valid).
    pub action: FlowAction,
}

const _: () = assert!(size_of::<CounterRecord>() == 32);
const _: () = assert!(size_of::<TableDumpRecord>() == 128);

impl CounterRecord {
    /// Size in bytes.
    pub const SIZE: usize = 32;

    /// The record of slot `flow_id`.
    #[must_use]
    pub fn new(flow_id: FlowId, valid: bool, generation: u8, counters: FlowCounters) -> Self {
        Self {
            flow_id: Le32::new(flow_id.get()),
            flags: Le32::new(RecordFlags::encode(valid, generation)),
            packets: Le32::new(counters.packets),
            reserved: Le32::ZERO,
            bytes: Le64::new(counters.bytes),
            last_hit: Le64::new(counters.last_hit),
        }
    }

    /// Whether an entry is installed in the slot.
    #[must_use]
    pub fn valid(&self) -> bool {
        RecordFlags::from_bits_retain(self.flags.get()).contains(RecordFlags::VALID)
    }

    /// The slot's generation.
    #[must_use]
    pub fn generation(&self) -> u8 {
        RecordFlags::generation(self.flags.get())
    }

    /// The counters.
    #[must_use]
    pub fn counters(&self) -> FlowCounters {
        FlowCounters {
            packets: self.packets.get(),
            bytes: self.bytes.get(),
            last_hit: self.last_hit.get(),
        }
    }

    /// The 32-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        put(
            &mut b,
            offset_of!(Self, flow_id),
            &self.flow_id.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, flags), &self.flags.to_le_bytes());
        put(
            &mut b,
            offset_of!(Self, packets),
            &self.packets.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, reserved),
            &self.reserved.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, bytes), &self.bytes.to_le_bytes());
        put(
            &mut b,
            offset_of!(Self, last_hit),
            &self.last_hit.to_le_bytes(),
        );
        b
    }

    /// Decodes a 32-byte memory image (any bit pattern).
    #[must_use]
    pub fn from_bytes(b: &[u8; 32]) -> Self {
        Self {
            flow_id: Le32::from_le_bytes(take(b, offset_of!(Self, flow_id))),
            flags: Le32::from_le_bytes(take(b, offset_of!(Self, flags))),
            packets: Le32::from_le_bytes(take(b, offset_of!(Self, packets))),
            reserved: Le32::from_le_bytes(take(b, offset_of!(Self, reserved))),
            bytes: Le64::from_le_bytes(take(b, offset_of!(Self, bytes))),
            last_hit: Le64::from_le_bytes(take(b, offset_of!(Self, last_hit))),
        }
    }
}

impl TableDumpRecord {
    /// Size in bytes.
    pub const SIZE: usize = 128;

    /// The record of slot `flow_id`; an invalid slot has zero key and action.
    #[must_use]
    pub fn new(flow_id: FlowId, generation: u8, entry: Option<(FlowKey, FlowAction)>) -> Self {
        let (valid, key, action) = match entry {
            Some((key, action)) => (true, key, action),
            None => (false, FlowKey::default(), FlowAction::default()),
        };
        Self {
            flow_id: Le32::new(flow_id.get()),
            flags: Le32::new(RecordFlags::encode(valid, generation)),
            reserved: [0; 8],
            key,
            action,
        }
    }

    /// Whether an entry is installed in the slot.
    #[must_use]
    pub fn valid(&self) -> bool {
        RecordFlags::from_bits_retain(self.flags.get()).contains(RecordFlags::VALID)
    }

    /// The slot's generation.
    #[must_use]
    pub fn generation(&self) -> u8 {
        RecordFlags::generation(self.flags.get())
    }

    /// The 128-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 128] {
        let mut b = [0u8; 128];
        put(
            &mut b,
            offset_of!(Self, flow_id),
            &self.flow_id.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, flags), &self.flags.to_le_bytes());
        put(&mut b, offset_of!(Self, reserved), &self.reserved);
        put(&mut b, offset_of!(Self, key), &self.key.to_bytes());
        put(&mut b, offset_of!(Self, action), &self.action.to_bytes());
        b
    }

    /// Decodes a 128-byte memory image (any bit pattern).
    #[must_use]
    pub fn from_bytes(b: &[u8; 128]) -> Self {
        Self {
            flow_id: Le32::from_le_bytes(take(b, offset_of!(Self, flow_id))),
            flags: Le32::from_le_bytes(take(b, offset_of!(Self, flags))),
            reserved: take(b, offset_of!(Self, reserved)),
            key: FlowKey::from_bytes(&take(b, offset_of!(Self, key))),
            action: FlowAction::from_bytes(&take(b, offset_of!(Self, action))),
        }
    }
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;
    use core::net::Ipv4Addr;

    use super::*;
    use crate::L4Proto;

    #[test]
    fn golden_layout() {
        assert_eq!(size_of::<CounterRecord>(), 32);
        assert_eq!(CounterRecord::SIZE, 32);
        assert_eq!(offset_of!(CounterRecord, flow_id), 0);
        assert_eq!(offset_of!(CounterRecord, flags), 4);
        assert_eq!(offset_of!(CounterRecord, packets), 8);
        assert_eq!(offset_of!(CounterRecord, reserved), 12);
        assert_eq!(offset_of!(CounterRecord, bytes), 16);
        assert_eq!(offset_of!(CounterRecord, last_hit), 24);

        assert_eq!(size_of::<TableDumpRecord>(), 128);
        assert_eq!(TableDumpRecord::SIZE, 128);
        assert_eq!(offset_of!(TableDumpRecord, flow_id), 0);
        assert_eq!(offset_of!(TableDumpRecord, flags), 4);
        assert_eq!(offset_of!(TableDumpRecord, reserved), 8);
        assert_eq!(offset_of!(TableDumpRecord, key), 16);
        assert_eq!(offset_of!(TableDumpRecord, action), 64);
    }

    #[test]
    fn golden_flags() {
        assert_eq!(RecordFlags::VALID.bits(), 1);
        assert_eq!(RecordFlags::GENERATION_MASK, 0x0000_FF00);
        assert_eq!(RecordFlags::encode(true, 0xAB), 0x0000_AB01);
        assert_eq!(RecordFlags::encode(false, 0x01), 0x0000_0100);
        assert_eq!(RecordFlags::generation(0xFFFF_AB01), 0xAB);
    }

    #[test]
    fn counter_record_round_trip() {
        let id = FlowId::new(77).expect("valid");
        let c = FlowCounters {
            packets: u32::MAX,
            bytes: 0xFFFF_FFFF_FFFF,
            last_hit: 0x0123_4567_89AB_CDEF,
        };
        let r = CounterRecord::new(id, true, 5, c);
        let b = r.to_bytes();
        assert_eq!(&b[0..4], &77u32.to_le_bytes());
        assert_eq!(&b[4..8], &0x0000_0501u32.to_le_bytes());
        assert_eq!(&b[8..12], &[0xFF; 4]);
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(&b[16..24], &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]);
        assert_eq!(&b[24..32], &0x0123_4567_89AB_CDEFu64.to_le_bytes());
        let back = CounterRecord::from_bytes(&b);
        assert_eq!(back, r);
        assert!(back.valid());
        assert_eq!(back.generation(), 5);
        assert_eq!(back.counters(), c);
        let empty = CounterRecord::new(id, false, 6, FlowCounters::default());
        assert!(!empty.valid());
        assert_eq!(empty.generation(), 6);
    }

    #[test]
    fn table_record_round_trip() {
        let key = FlowKey::ipv4(
            0,
            L4Proto::Tcp,
            0,
            Ipv4Addr::new(1, 2, 3, 4),
            1,
            Ipv4Addr::new(5, 6, 7, 8),
            2,
        );
        let action = FlowAction::forward(1).with_dec_ttl();
        let id = FlowId::new(3).expect("valid");
        let r = TableDumpRecord::new(id, 1, Some((key, action)));
        let b = r.to_bytes();
        assert_eq!(&b[0..8], &[3, 0, 0, 0, 1, 1, 0, 0]);
        assert_eq!(&b[16..64], &key.to_bytes());
        assert_eq!(&b[64..128], &action.to_bytes());
        assert_eq!(TableDumpRecord::from_bytes(&b), r);
        assert!(r.valid());
        let empty = TableDumpRecord::new(id, 1, None);
        assert!(!empty.valid());
        assert!(empty.to_bytes()[8..].iter().all(|&x| x == 0));

        let mut raw = [0u8; 128];
        for (i, x) in raw.iter_mut().enumerate() {
            *x = u8::try_from(i).expect("small");
        }
        assert_eq!(TableDumpRecord::from_bytes(&raw).to_bytes(), raw);
        let raw32: [u8; 32] = take(&raw, 96);
        assert_eq!(CounterRecord::from_bytes(&raw32).to_bytes(), raw32);
    }
}
