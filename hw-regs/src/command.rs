//! Command descriptors and completion entries (device.md sections 6 and 7).

use core::mem::offset_of;

use bitflags::bitflags;

use crate::le::{Le16, Le32, Le64, put, take};
use crate::{CompletionStatus, Error, FlowAction, FlowCounters, FlowId, FlowKey, Iova, Opcode};

bitflags! {
    /// Command flags, descriptor byte 1.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CommandFlags: u8 {
        /// `FLOW_DELETE`: identify the entry by key rather than `flow_id`.
        const BY_KEY = 1 << 0;
        /// `COUNTER_DUMP` only (`FEATURES.COUNTER_DUMP_CHANGED`): report only the
        /// entries hit since the last `CHANGED` dump of their slot, as packed records.
        const CHANGED = 1 << 1;
    }
}

bitflags! {
    /// Completion flags, completion byte 31 (part of the ownership word).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CompletionFlags: u8 {
        /// Phase bit: inverted by the device on every wrap of the ring; 1 on the first pass.
        const PHASE = 1 << 0;
    }
}

/// Operand of the flow opcodes: key then action (112 bytes, descriptor offset 16).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowOperand {
    /// Operand bytes 0–47 (descriptor 16–63).
    pub key: FlowKey,
    /// Operand bytes 48–111 (descriptor 64–127). Zero for delete and query.
    pub action: FlowAction,
}

/// Operand of the dump opcodes (112 bytes, descriptor offset 16).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DumpOperand {
    /// Operand bytes 0–7 (descriptor 16–23): IOVA of the record buffer, 64-byte aligned.
    pub dma_addr: Le64,
    /// Operand bytes 8–111: reserved, zero.
    pub reserved: [u8; 104],
}

/// A 128-byte command descriptor.
///
/// Bytes 16–127 are an opcode-specific operand, kept as bytes here and decoded with
/// [`CommandDescriptor::flow_operand`] or [`CommandDescriptor::dump_operand`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandDescriptor {
    /// Byte 0: [`Opcode`].
    pub opcode: u8,
    /// Byte 1: [`CommandFlags`].
    pub flags: u8,
    /// Bytes 2–3: reserved, zero.
    pub reserved0: Le16,
    /// Bytes 4–7: echoed in the completion.
    pub cookie: Le32,
    /// Bytes 8–11: slot for delete-by-id and modify, first slot for dumps, else zero.
    pub flow_id: Le32,
    /// Bytes 12–15: record count for dumps, else zero.
    pub count: Le32,
    /// Bytes 16–127: [`FlowOperand`] or [`DumpOperand`] image.
    pub operand: [u8; 112],
}

/// A 32-byte completion entry, written by the device.
///
/// Bytes 28–31 (`status`, `opcode`, `generation`, `flags`) are the ownership word,
/// written last as one 32-bit write.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Completion {
    /// Bytes 0–3: the command's cookie.
    pub cookie: Le32,
    /// Bytes 4–7: flow id, or `0xFFFF_FFFF`.
    pub flow_id: Le32,
    /// Bytes 8–15: query/delete: bytes counter (48 bits).
    pub value0: Le64,
    /// Bytes 16–23: query/delete: `last_hit`.
    pub value1: Le64,
    /// Bytes 24–27: dumps: records written; query/delete: packets counter.
    pub count: Le32,
    /// Byte 28: [`CompletionStatus`].
    pub status: u8,
    /// Byte 29: the command's opcode byte.
    pub opcode: u8,
    /// Byte 30: slot generation.
    pub generation: u8,
    /// Byte 31: [`CompletionFlags`].
    pub flags: u8,
}

const _: () = assert!(size_of::<FlowOperand>() == 112);
const _: () = assert!(size_of::<DumpOperand>() == 112);
const _: () = assert!(size_of::<CommandDescriptor>() == 128);
const _: () = assert!(size_of::<Completion>() == 32);

impl FlowOperand {
    /// The 112-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 112] {
        let mut b = [0u8; 112];
        put(&mut b, offset_of!(Self, key), &self.key.to_bytes());
        put(&mut b, offset_of!(Self, action), &self.action.to_bytes());
        b
    }

    /// Decodes a 112-byte memory image.
    #[must_use]
    pub fn from_bytes(b: &[u8; 112]) -> Self {
        Self {
            key: FlowKey::from_bytes(&take(b, offset_of!(Self, key))),
            action: FlowAction::from_bytes(&take(b, offset_of!(Self, action))),
        }
    }
}

impl DumpOperand {
    /// A dump operand for a buffer at `buf`.
    #[must_use]
    pub const fn new(buf: Iova) -> Self {
        Self {
            dma_addr: Le64::new(buf.get()),
            reserved: [0; 104],
        }
    }

    /// The buffer IOVA.
    #[must_use]
    pub const fn iova(&self) -> Iova {
        Iova::new(self.dma_addr.get())
    }

    /// The 112-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 112] {
        let mut b = [0u8; 112];
        put(
            &mut b,
            offset_of!(Self, dma_addr),
            &self.dma_addr.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, reserved), &self.reserved);
        b
    }

    /// Decodes a 112-byte memory image.
    #[must_use]
    pub fn from_bytes(b: &[u8; 112]) -> Self {
        Self {
            dma_addr: Le64::from_le_bytes(take(b, offset_of!(Self, dma_addr))),
            reserved: take(b, offset_of!(Self, reserved)),
        }
    }
}

impl CommandDescriptor {
    /// Size in bytes.
    pub const SIZE: usize = 128;
    /// Offset of the operand in the descriptor.
    pub const OPERAND_OFFSET: usize = 16;

    /// An all-zero descriptor (a `NOP` with cookie 0).
    #[must_use]
    pub const fn zeroed() -> Self {
        Self {
            opcode: 0,
            flags: 0,
            reserved0: Le16::ZERO,
            cookie: Le32::ZERO,
            flow_id: Le32::ZERO,
            count: Le32::ZERO,
            operand: [0; 112],
        }
    }

    fn header(opcode: Opcode, flags: CommandFlags, cookie: u32) -> Self {
        Self {
            opcode: opcode.raw(),
            flags: flags.bits(),
            cookie: Le32::new(cookie),
            ..Self::zeroed()
        }
    }

    fn with_flow_operand(mut self, key: &FlowKey, action: &FlowAction) -> Self {
        self.operand = FlowOperand {
            key: *key,
            action: *action,
        }
        .to_bytes();
        self
    }

    /// `NOP`.
    #[must_use]
    pub fn nop(cookie: u32) -> Self {
        Self::header(Opcode::Nop, CommandFlags::empty(), cookie)
    }

    /// `FLOW_INSERT` of `key` with `action`.
    #[must_use]
    pub fn flow_insert(cookie: u32, key: &FlowKey, action: &FlowAction) -> Self {
        Self::header(Opcode::FlowInsert, CommandFlags::empty(), cookie)
            .with_flow_operand(key, action)
    }

    /// `FLOW_DELETE` of slot `flow_id`, which must hold `key`.
    #[must_use]
    pub fn flow_delete(cookie: u32, flow_id: FlowId, key: &FlowKey) -> Self {
        let mut d = Self::header(Opcode::FlowDelete, CommandFlags::empty(), cookie)
            .with_flow_operand(key, &FlowAction::default());
        d.flow_id = Le32::new(flow_id.get());
        d
    }

    /// `FLOW_DELETE` of `key`, wherever it is (`BY_KEY`).
    #[must_use]
    pub fn flow_delete_by_key(cookie: u32, key: &FlowKey) -> Self {
        Self::header(Opcode::FlowDelete, CommandFlags::BY_KEY, cookie)
            .with_flow_operand(key, &FlowAction::default())
    }

    /// `FLOW_MODIFY` of slot `flow_id`, which must hold `key`, to `action`.
    #[must_use]
    pub fn flow_modify(cookie: u32, flow_id: FlowId, key: &FlowKey, action: &FlowAction) -> Self {
        let mut d = Self::header(Opcode::FlowModify, CommandFlags::empty(), cookie)
            .with_flow_operand(key, action);
        d.flow_id = Le32::new(flow_id.get());
        d
    }

    /// `FLOW_QUERY` of `key`.
    #[must_use]
    pub fn flow_query(cookie: u32, key: &FlowKey) -> Self {
        Self::header(Opcode::FlowQuery, CommandFlags::empty(), cookie)
            .with_flow_operand(key, &FlowAction::default())
    }

    fn dump(
        opcode: Opcode,
        flags: CommandFlags,
        cookie: u32,
        first: FlowId,
        count: u32,
        buf: Iova,
    ) -> Self {
        let mut d = Self::header(opcode, flags, cookie);
        d.flow_id = Le32::new(first.get());
        d.count = Le32::new(count);
        d.operand = DumpOperand::new(buf).to_bytes();
        d
    }

    /// `TABLE_DUMP` of slots `[first, first + count)` into 128-byte records at `buf`.
    #[must_use]
    pub fn table_dump(cookie: u32, first: FlowId, count: u32, buf: Iova) -> Self {
        Self::dump(
            Opcode::TableDump,
            CommandFlags::empty(),
            cookie,
            first,
            count,
            buf,
        )
    }

    /// `COUNTER_DUMP` of slots `[first, first + count)` into 32-byte records at `buf`.
    #[must_use]
    pub fn counter_dump(cookie: u32, first: FlowId, count: u32, buf: Iova) -> Self {
        Self::dump(
            Opcode::CounterDump,
            CommandFlags::empty(),
            cookie,
            first,
            count,
            buf,
        )
    }

    /// `COUNTER_DUMP` with `CHANGED` of slots `[first, first + count)`: packed 32-byte
    /// records at `buf`, one per entry hit since the last `CHANGED` dump of its slot.
    #[must_use]
    pub fn counter_dump_changed(cookie: u32, first: FlowId, count: u32, buf: Iova) -> Self {
        Self::dump(
            Opcode::CounterDump,
            CommandFlags::CHANGED,
            cookie,
            first,
            count,
            buf,
        )
    }

    /// Decodes `opcode`.
    ///
    /// # Errors
    /// [`Error::UnknownOpcode`] for an undefined opcode.
    pub fn opcode(&self) -> Result<Opcode, Error> {
        Opcode::try_from(self.opcode)
    }

    /// The flags, including reserved bits that are set.
    #[must_use]
    pub fn flags(&self) -> CommandFlags {
        CommandFlags::from_bits_retain(self.flags)
    }

    /// The operand read as key and action.
    #[must_use]
    pub fn flow_operand(&self) -> FlowOperand {
        FlowOperand::from_bytes(&self.operand)
    }

    /// The operand read as a dump buffer address.
    #[must_use]
    pub fn dump_operand(&self) -> DumpOperand {
        DumpOperand::from_bytes(&self.operand)
    }

    /// The 128-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 128] {
        let mut b = [0u8; 128];
        b[offset_of!(Self, opcode)] = self.opcode;
        b[offset_of!(Self, flags)] = self.flags;
        put(
            &mut b,
            offset_of!(Self, reserved0),
            &self.reserved0.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, cookie), &self.cookie.to_le_bytes());
        put(
            &mut b,
            offset_of!(Self, flow_id),
            &self.flow_id.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, count), &self.count.to_le_bytes());
        put(&mut b, offset_of!(Self, operand), &self.operand);
        b
    }

    /// Decodes a 128-byte memory image (any bit pattern).
    #[must_use]
    pub fn from_bytes(b: &[u8; 128]) -> Self {
        Self {
            opcode: b[offset_of!(Self, opcode)],
            flags: b[offset_of!(Self, flags)],
            reserved0: Le16::from_le_bytes(take(b, offset_of!(Self, reserved0))),
            cookie: Le32::from_le_bytes(take(b, offset_of!(Self, cookie))),
            flow_id: Le32::from_le_bytes(take(b, offset_of!(Self, flow_id))),
            count: Le32::from_le_bytes(take(b, offset_of!(Self, count))),
            operand: take(b, offset_of!(Self, operand)),
        }
    }
}

impl Completion {
    /// Size in bytes.
    pub const SIZE: usize = 32;
    /// Offset of the ownership word (status, opcode, generation, flags), written last.
    pub const OWNERSHIP_WORD_OFFSET: usize = 28;

    /// A completion for a command with `cookie` and raw `opcode`, with `flow_id`
    /// `0xFFFF_FFFF` and every value zero. Used by the device side.
    #[must_use]
    pub fn new(cookie: u32, opcode: u8, status: CompletionStatus, phase: bool) -> Self {
        let flags = if phase {
            CompletionFlags::PHASE
        } else {
            CompletionFlags::empty()
        };
        Self {
            cookie: Le32::new(cookie),
            flow_id: Le32::new(FlowId::NONE_RAW),
            status: status.raw(),
            opcode,
            flags: flags.bits(),
            ..Self::default()
        }
    }

    /// Sets `flow_id` and `generation`.
    #[must_use]
    pub fn with_flow(mut self, flow_id: FlowId, generation: u8) -> Self {
        self.flow_id = Le32::new(flow_id.get());
        self.generation = generation;
        self
    }

    /// Sets the counters of a query or delete: `count` = packets, `value0` = bytes,
    /// `value1` = last hit.
    #[must_use]
    pub fn with_counters(mut self, counters: FlowCounters) -> Self {
        self.count = Le32::new(counters.packets);
        self.value0 = Le64::new(counters.bytes);
        self.value1 = Le64::new(counters.last_hit);
        self
    }

    /// Sets `count` (records written by a dump).
    #[must_use]
    pub fn with_count(mut self, count: u32) -> Self {
        self.count = Le32::new(count);
        self
    }

    /// The phase bit.
    #[must_use]
    pub fn phase(&self) -> bool {
        self.flags().contains(CompletionFlags::PHASE)
    }

    /// The flags, including reserved bits that are set.
    #[must_use]
    pub fn flags(&self) -> CompletionFlags {
        CompletionFlags::from_bits_retain(self.flags)
    }

    /// Decodes `status`.
    ///
    /// # Errors
    /// [`Error::UnknownCompletionStatus`] for an undefined status.
    pub fn status(&self) -> Result<CompletionStatus, Error> {
        CompletionStatus::try_from(self.status)
    }

    /// Decodes the echoed `opcode`.
    ///
    /// # Errors
    /// [`Error::UnknownOpcode`] if the command had an undefined opcode.
    pub fn opcode(&self) -> Result<Opcode, Error> {
        Opcode::try_from(self.opcode)
    }

    /// The flow id, or `None` for `0xFFFF_FFFF`.
    #[must_use]
    pub fn flow_id(&self) -> Option<FlowId> {
        FlowId::new(self.flow_id.get())
    }

    /// The counters of a query or delete completion.
    #[must_use]
    pub fn counters(&self) -> FlowCounters {
        FlowCounters {
            packets: self.count.get(),
            bytes: self.value0.get(),
            last_hit: self.value1.get(),
        }
    }

    /// The ownership word (bytes 28–31) as the 32-bit value the device writes last.
    #[must_use]
    pub fn ownership_word(&self) -> u32 {
        u32::from_le_bytes([self.status, self.opcode, self.generation, self.flags])
    }

    /// The 32-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        put(&mut b, offset_of!(Self, cookie), &self.cookie.to_le_bytes());
        put(
            &mut b,
            offset_of!(Self, flow_id),
            &self.flow_id.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, value0), &self.value0.to_le_bytes());
        put(&mut b, offset_of!(Self, value1), &self.value1.to_le_bytes());
        put(&mut b, offset_of!(Self, count), &self.count.to_le_bytes());
        b[offset_of!(Self, status)] = self.status;
        b[offset_of!(Self, opcode)] = self.opcode;
        b[offset_of!(Self, generation)] = self.generation;
        b[offset_of!(Self, flags)] = self.flags;
        b
    }

    /// Decodes a 32-byte memory image (any bit pattern).
    #[must_use]
    pub fn from_bytes(b: &[u8; 32]) -> Self {
        Self {
            cookie: Le32::from_le_bytes(take(b, offset_of!(Self, cookie))),
            flow_id: Le32::from_le_bytes(take(b, offset_of!(Self, flow_id))),
            value0: Le64::from_le_bytes(take(b, offset_of!(Self, value0))),
            value1: Le64::from_le_bytes(take(b, offset_of!(Self, value1))),
            count: Le32::from_le_bytes(take(b, offset_of!(Self, count))),
            status: b[offset_of!(Self, status)],
            opcode: b[offset_of!(Self, opcode)],
            generation: b[offset_of!(Self, generation)],
            flags: b[offset_of!(Self, flags)],
        }
    }
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;
    use core::net::Ipv4Addr;

    use super::*;
    use crate::L4Proto;

    fn key() -> FlowKey {
        FlowKey::ipv4(
            1,
            L4Proto::Udp,
            7,
            Ipv4Addr::new(10, 0, 0, 1),
            5353,
            Ipv4Addr::new(10, 0, 0, 2),
            53,
        )
    }

    fn pattern<const N: usize>(seed: u8) -> [u8; N] {
        let mut b = [0u8; N];
        let mut x = seed;
        for byte in &mut b {
            x = x.wrapping_mul(31).wrapping_add(17);
            *byte = x;
        }
        b
    }

    #[test]
    fn golden_layout() {
        assert_eq!(size_of::<CommandDescriptor>(), 128);
        assert_eq!(CommandDescriptor::SIZE, 128);
        assert_eq!(offset_of!(CommandDescriptor, opcode), 0);
        assert_eq!(offset_of!(CommandDescriptor, flags), 1);
        assert_eq!(offset_of!(CommandDescriptor, reserved0), 2);
        assert_eq!(offset_of!(CommandDescriptor, cookie), 4);
        assert_eq!(offset_of!(CommandDescriptor, flow_id), 8);
        assert_eq!(offset_of!(CommandDescriptor, count), 12);
        assert_eq!(offset_of!(CommandDescriptor, operand), 16);
        assert_eq!(CommandDescriptor::OPERAND_OFFSET, 16);

        assert_eq!(size_of::<FlowOperand>(), 112);
        assert_eq!(offset_of!(FlowOperand, key), 0); // descriptor offset 16
        assert_eq!(offset_of!(FlowOperand, action), 48); // descriptor offset 64
        assert_eq!(size_of::<DumpOperand>(), 112);
        assert_eq!(offset_of!(DumpOperand, dma_addr), 0); // descriptor offset 16
        assert_eq!(offset_of!(DumpOperand, reserved), 8); // descriptor offset 24

        assert_eq!(size_of::<Completion>(), 32);
        assert_eq!(Completion::SIZE, 32);
        assert_eq!(offset_of!(Completion, cookie), 0);
        assert_eq!(offset_of!(Completion, flow_id), 4);
        assert_eq!(offset_of!(Completion, value0), 8);
        assert_eq!(offset_of!(Completion, value1), 16);
        assert_eq!(offset_of!(Completion, count), 24);
        assert_eq!(offset_of!(Completion, status), 28);
        assert_eq!(offset_of!(Completion, opcode), 29);
        assert_eq!(offset_of!(Completion, generation), 30);
        assert_eq!(offset_of!(Completion, flags), 31);
        assert_eq!(Completion::OWNERSHIP_WORD_OFFSET, 28);
    }

    #[test]
    fn golden_flags() {
        assert_eq!(CommandFlags::BY_KEY.bits(), 0x01);
        assert_eq!(CompletionFlags::PHASE.bits(), 0x01);
    }

    #[test]
    fn constructors_encode_documented_bytes() {
        let k = key();
        let a = FlowAction::forward(0).with_dec_ttl();
        let ins = CommandDescriptor::flow_insert(0xA1B2_C3D4, &k, &a);
        let b = ins.to_bytes();
        assert_eq!(
            &b[..16],
            &[1, 0, 0, 0, 0xD4, 0xC3, 0xB2, 0xA1, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&b[16..64], &k.to_bytes());
        assert_eq!(&b[64..128], &a.to_bytes());
        assert_eq!(ins.opcode(), Ok(Opcode::FlowInsert));
        assert_eq!(ins.flow_operand(), FlowOperand { key: k, action: a });

        let id = FlowId::new(0x0102_0304).expect("valid");
        let del = CommandDescriptor::flow_delete(9, id, &k);
        let b = del.to_bytes();
        assert_eq!((b[0], b[1]), (2, 0));
        assert_eq!(&b[8..12], &[4, 3, 2, 1]);
        assert_eq!(&b[16..64], &k.to_bytes());
        assert!(b[64..].iter().all(|&x| x == 0));

        let by_key = CommandDescriptor::flow_delete_by_key(9, &k);
        assert_eq!(by_key.flags(), CommandFlags::BY_KEY);
        assert_eq!(by_key.flow_id.get(), 0);

        let m = CommandDescriptor::flow_modify(1, id, &k, &FlowAction::discard());
        assert_eq!(m.opcode(), Ok(Opcode::FlowModify));
        assert_eq!(m.flow_id.get(), 0x0102_0304);
        assert_eq!(m.flow_operand().action, FlowAction::discard());

        let q = CommandDescriptor::flow_query(2, &k);
        assert_eq!(q.opcode(), Ok(Opcode::FlowQuery));
        assert_eq!(q.flow_operand().action, FlowAction::default());

        let nop = CommandDescriptor::nop(0xFFFF_FFFF);
        let b = nop.to_bytes();
        assert_eq!(&b[4..8], &[0xFF; 4]);
        assert!(b[..4].iter().chain(&b[8..]).all(|&x| x == 0));

        let first = FlowId::new(64).expect("valid");
        let dump = CommandDescriptor::counter_dump(3, first, 1000, Iova::new(0x1_0000_0040));
        let b = dump.to_bytes();
        assert_eq!(b[0], 6);
        assert_eq!(&b[8..12], &64u32.to_le_bytes());
        assert_eq!(&b[12..16], &1000u32.to_le_bytes());
        assert_eq!(&b[16..24], &0x1_0000_0040u64.to_le_bytes());
        assert!(b[24..].iter().all(|&x| x == 0));
        assert_eq!(dump.dump_operand().iova(), Iova::new(0x1_0000_0040));
        let t = CommandDescriptor::table_dump(3, first, 1, Iova::new(0x40));
        assert_eq!(t.opcode(), Ok(Opcode::TableDump));
    }

    #[test]
    fn descriptor_round_trips() {
        let b: [u8; 128] = pattern(3);
        let d = CommandDescriptor::from_bytes(&b);
        assert_eq!(d.to_bytes(), b);
        assert_eq!(d.cookie.get(), u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
        let op: [u8; 112] = pattern(5);
        assert_eq!(FlowOperand::from_bytes(&op).to_bytes(), op);
        assert_eq!(DumpOperand::from_bytes(&op).to_bytes(), op);
        let mut bad = CommandDescriptor::zeroed();
        bad.opcode = 7;
        assert_eq!(bad.opcode(), Err(Error::UnknownOpcode { value: 7 }));
    }

    #[test]
    fn completion_encoding() {
        let id = FlowId::new(12345).expect("valid");
        let c = Completion::new(
            0xDEAD_BEEF,
            Opcode::FlowQuery.raw(),
            CompletionStatus::Ok,
            true,
        )
        .with_flow(id, 3)
        .with_counters(FlowCounters {
            packets: 10,
            bytes: 0xFFFF_FFFF_FFFF,
            last_hit: 99,
        });
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &0xDEAD_BEEFu32.to_le_bytes());
        assert_eq!(&b[4..8], &12345u32.to_le_bytes());
        assert_eq!(&b[8..16], &0xFFFF_FFFF_FFFFu64.to_le_bytes());
        assert_eq!(&b[16..24], &99u64.to_le_bytes());
        assert_eq!(&b[24..28], &10u32.to_le_bytes());
        assert_eq!(&b[28..32], &[0, 4, 3, 1]);
        assert_eq!(c.ownership_word(), u32::from_le_bytes([0, 4, 3, 1]));
        assert!(c.phase());
        assert_eq!(c.status(), Ok(CompletionStatus::Ok));
        assert_eq!(c.opcode(), Ok(Opcode::FlowQuery));
        assert_eq!(c.flow_id(), Some(id));
        assert_eq!(c.counters().bytes, 0xFFFF_FFFF_FFFF);
        assert_eq!(Completion::from_bytes(&b), c);

        let e = Completion::new(1, 0x77, CompletionStatus::BadDescriptor, false);
        assert!(!e.phase());
        assert_eq!(e.flow_id(), None);
        assert_eq!(e.opcode(), Err(Error::UnknownOpcode { value: 0x77 }));
        assert_eq!(e.to_bytes()[4..8], [0xFF; 4]);
        assert_eq!(
            Completion::new(1, 5, CompletionStatus::Ok, true)
                .with_count(8)
                .count
                .get(),
            8
        );

        let raw: [u8; 32] = pattern(9);
        assert_eq!(Completion::from_bytes(&raw).to_bytes(), raw);
    }
}
