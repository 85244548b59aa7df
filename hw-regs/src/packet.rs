//! Exception RX and host TX descriptors (device.md sections 13 and 14).

use core::mem::offset_of;

use bitflags::bitflags;

use crate::le::{Le16, Le32, Le64, put, take};
use crate::{Error, FlowId, Iova, RxReason, TxError};

bitflags! {
    /// RX descriptor status word, bytes 28–31, written last by the device.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RxStatus: u32 {
        /// Descriptor done: the buffer holds a frame and bytes 10–31 are valid.
        const DD = 1 << 0;
        /// The frame carries one 802.1Q tag (left in the frame).
        const VLAN = 1 << 1;
    }
}

bitflags! {
    /// TX descriptor status byte 12 (in the ownership word, bytes 12–15).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct TxStatus: u8 {
        /// Descriptor done.
        const DD = 1 << 0;
        /// The descriptor was rejected; see the error byte. Nothing was sent.
        const ERR = 1 << 1;
    }
}

/// A 32-byte exception RX descriptor: posted by the driver, written back in place.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RxDescriptor {
    /// Bytes 0–7 (driver): buffer IOVA.
    pub buf_addr: Le64,
    /// Bytes 8–9 (driver): buffer length.
    pub buf_len: Le16,
    /// Bytes 10–11 (device): frame length written, without FCS.
    pub pkt_len: Le16,
    /// Bytes 12–15 (device): matched slot, or `0xFFFF_FFFF`.
    pub flow_id: Le32,
    /// Bytes 16–23 (device): `TIMESTAMP` at reception.
    pub timestamp: Le64,
    /// Byte 24 (device): ingress port.
    pub port: u8,
    /// Byte 25 (device): [`RxReason`].
    pub reason: u8,
    /// Bytes 26–27: reserved, zero.
    pub reserved: Le16,
    /// Bytes 28–31 (device, last): [`RxStatus`]. Zero when posted.
    pub status: Le32,
}

/// A 16-byte host TX descriptor.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TxDescriptor {
    /// Bytes 0–7 (driver): frame IOVA.
    pub buf_addr: Le64,
    /// Bytes 8–9 (driver): frame length without FCS, 14 to `MAX_FRAME_LEN`.
    pub len: Le16,
    /// Byte 10 (driver): egress port.
    pub port: u8,
    /// Byte 11 (driver): reserved, zero.
    pub flags: u8,
    /// Byte 12 (device): [`TxStatus`]. Zero when posted.
    pub status: u8,
    /// Byte 13 (device): [`TxError`] when `ERR` is set.
    pub error: u8,
    /// Bytes 14–15: reserved, zero.
    pub reserved: Le16,
}

const _: () = assert!(size_of::<RxDescriptor>() == 32);
const _: () = assert!(size_of::<TxDescriptor>() == 16);

impl RxDescriptor {
    /// Size in bytes.
    pub const SIZE: usize = 32;
    /// Offset of the status word, written last by the device.
    pub const STATUS_OFFSET: usize = 28;

    /// A descriptor posting a buffer of `len` bytes at `buf` (device fields zero).
    #[must_use]
    pub fn posted(buf: Iova, len: u16) -> Self {
        Self {
            buf_addr: Le64::new(buf.get()),
            buf_len: Le16::new(len),
            ..Self::default()
        }
    }

    /// The buffer IOVA.
    #[must_use]
    pub fn buf(&self) -> Iova {
        Iova::new(self.buf_addr.get())
    }

    /// The status bits, including reserved bits that are set.
    #[must_use]
    pub fn status(&self) -> RxStatus {
        RxStatus::from_bits_retain(self.status.get())
    }

    /// Whether the device has written the descriptor back.
    #[must_use]
    pub fn done(&self) -> bool {
        self.status().contains(RxStatus::DD)
    }

    /// Decodes `reason`.
    ///
    /// # Errors
    /// [`Error::UnknownRxReason`] for an undefined reason.
    pub fn reason(&self) -> Result<RxReason, Error> {
        RxReason::try_from(self.reason)
    }

    /// The matched slot, or `None` for `0xFFFF_FFFF`.
    #[must_use]
    pub fn flow_id(&self) -> Option<FlowId> {
        FlowId::new(self.flow_id.get())
    }

    /// The 32-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        put(
            &mut b,
            offset_of!(Self, buf_addr),
            &self.buf_addr.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, buf_len),
            &self.buf_len.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, pkt_len),
            &self.pkt_len.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, flow_id),
            &self.flow_id.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, timestamp),
            &self.timestamp.to_le_bytes(),
        );
        b[offset_of!(Self, port)] = self.port;
        b[offset_of!(Self, reason)] = self.reason;
        put(
            &mut b,
            offset_of!(Self, reserved),
            &self.reserved.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, status), &self.status.to_le_bytes());
        b
    }

    /// Decodes a 32-byte memory image (any bit pattern).
    #[must_use]
    pub fn from_bytes(b: &[u8; 32]) -> Self {
        Self {
            buf_addr: Le64::from_le_bytes(take(b, offset_of!(Self, buf_addr))),
            buf_len: Le16::from_le_bytes(take(b, offset_of!(Self, buf_len))),
            pkt_len: Le16::from_le_bytes(take(b, offset_of!(Self, pkt_len))),
            flow_id: Le32::from_le_bytes(take(b, offset_of!(Self, flow_id))),
            timestamp: Le64::from_le_bytes(take(b, offset_of!(Self, timestamp))),
            port: b[offset_of!(Self, port)],
            reason: b[offset_of!(Self, reason)],
            reserved: Le16::from_le_bytes(take(b, offset_of!(Self, reserved))),
            status: Le32::from_le_bytes(take(b, offset_of!(Self, status))),
        }
    }
}

impl TxDescriptor {
    /// Size in bytes.
    pub const SIZE: usize = 16;
    /// Offset of the ownership word (status, error, reserved), written last by the device.
    pub const OWNERSHIP_WORD_OFFSET: usize = 12;

    /// A descriptor sending `len` bytes at `buf` on `port`.
    #[must_use]
    pub fn new(buf: Iova, len: u16, port: u8) -> Self {
        Self {
            buf_addr: Le64::new(buf.get()),
            len: Le16::new(len),
            port,
            ..Self::default()
        }
    }

    /// The frame IOVA.
    #[must_use]
    pub fn buf(&self) -> Iova {
        Iova::new(self.buf_addr.get())
    }

    /// The status bits, including reserved bits that are set.
    #[must_use]
    pub fn status(&self) -> TxStatus {
        TxStatus::from_bits_retain(self.status)
    }

    /// Whether the device has written the descriptor back.
    #[must_use]
    pub fn done(&self) -> bool {
        self.status().contains(TxStatus::DD)
    }

    /// Decodes `error`.
    ///
    /// # Errors
    /// [`Error::UnknownTxError`] for an undefined code.
    pub fn error(&self) -> Result<TxError, Error> {
        TxError::try_from(self.error)
    }

    /// The ownership word (bytes 12–15) as the 32-bit value the device writes last.
    #[must_use]
    pub fn ownership_word(&self) -> u32 {
        let r = self.reserved.to_le_bytes();
        u32::from_le_bytes([self.status, self.error, r[0], r[1]])
    }

    /// The 16-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put(
            &mut b,
            offset_of!(Self, buf_addr),
            &self.buf_addr.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, len), &self.len.to_le_bytes());
        b[offset_of!(Self, port)] = self.port;
        b[offset_of!(Self, flags)] = self.flags;
        b[offset_of!(Self, status)] = self.status;
        b[offset_of!(Self, error)] = self.error;
        put(
            &mut b,
            offset_of!(Self, reserved),
            &self.reserved.to_le_bytes(),
        );
        b
    }

    /// Decodes a 16-byte memory image (any bit pattern).
    #[must_use]
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            buf_addr: Le64::from_le_bytes(take(b, offset_of!(Self, buf_addr))),
            len: Le16::from_le_bytes(take(b, offset_of!(Self, len))),
            port: b[offset_of!(Self, port)],
            flags: b[offset_of!(Self, flags)],
            status: b[offset_of!(Self, status)],
            error: b[offset_of!(Self, error)],
            reserved: Le16::from_le_bytes(take(b, offset_of!(Self, reserved))),
        }
    }
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::*;

    #[test]
    fn golden_layout() {
        assert_eq!(size_of::<RxDescriptor>(), 32);
        assert_eq!(RxDescriptor::SIZE, 32);
        assert_eq!(offset_of!(RxDescriptor, buf_addr), 0);
        assert_eq!(offset_of!(RxDescriptor, buf_len), 8);
        assert_eq!(offset_of!(RxDescriptor, pkt_len), 10);
        assert_eq!(offset_of!(RxDescriptor, flow_id), 12);
        assert_eq!(offset_of!(RxDescriptor, timestamp), 16);
        assert_eq!(offset_of!(RxDescriptor, port), 24);
        assert_eq!(offset_of!(RxDescriptor, reason), 25);
        assert_eq!(offset_of!(RxDescriptor, reserved), 26);
        assert_eq!(offset_of!(RxDescriptor, status), 28);
        assert_eq!(RxDescriptor::STATUS_OFFSET, 28);

        assert_eq!(size_of::<TxDescriptor>(), 16);
        assert_eq!(TxDescriptor::SIZE, 16);
        assert_eq!(offset_of!(TxDescriptor, buf_addr), 0);
        assert_eq!(offset_of!(TxDescriptor, len), 8);
        assert_eq!(offset_of!(TxDescriptor, port), 10);
        assert_eq!(offset_of!(TxDescriptor, flags), 11);
        assert_eq!(offset_of!(TxDescriptor, status), 12);
        assert_eq!(offset_of!(TxDescriptor, error), 13);
        assert_eq!(offset_of!(TxDescriptor, reserved), 14);
        assert_eq!(TxDescriptor::OWNERSHIP_WORD_OFFSET, 12);
    }

    #[test]
    fn golden_flags() {
        assert_eq!(RxStatus::DD.bits(), 1);
        assert_eq!(RxStatus::VLAN.bits(), 2);
        assert_eq!(TxStatus::DD.bits(), 1);
        assert_eq!(TxStatus::ERR.bits(), 2);
    }

    #[test]
    fn rx_post_and_writeback() {
        let posted = RxDescriptor::posted(Iova::new(0xAB_0000), 9216);
        let b = posted.to_bytes();
        assert_eq!(&b[0..8], &0xAB_0000u64.to_le_bytes());
        assert_eq!(&b[8..10], &9216u16.to_le_bytes());
        assert!(b[10..].iter().all(|&x| x == 0));
        assert!(!posted.done());
        assert_eq!(posted.buf(), Iova::new(0xAB_0000));

        let wb = RxDescriptor {
            pkt_len: Le16::new(60),
            flow_id: Le32::new(FlowId::NONE_RAW),
            timestamp: Le64::new(1_000),
            port: 1,
            reason: RxReason::Miss.raw(),
            status: Le32::new((RxStatus::DD | RxStatus::VLAN).bits()),
            ..posted
        };
        let b = wb.to_bytes();
        assert_eq!(&b[10..12], &[60, 0]);
        assert_eq!(&b[12..16], &[0xFF; 4]);
        assert_eq!((b[24], b[25]), (1, 1));
        assert_eq!(&b[28..32], &[3, 0, 0, 0]);
        let back = RxDescriptor::from_bytes(&b);
        assert_eq!(back, wb);
        assert!(back.done());
        assert_eq!(back.reason(), Ok(RxReason::Miss));
        assert_eq!(back.flow_id(), None);
        let mut bad = back;
        bad.reason = 0;
        assert_eq!(bad.reason(), Err(Error::UnknownRxReason { value: 0 }));

        let mut raw = [0u8; 32];
        for (i, x) in raw.iter_mut().enumerate() {
            *x = u8::try_from(i * 3).expect("small");
        }
        assert_eq!(RxDescriptor::from_bytes(&raw).to_bytes(), raw);
    }

    #[test]
    fn tx_post_and_writeback() {
        let d = TxDescriptor::new(Iova::new(0x2000), 64, 1);
        let b = d.to_bytes();
        assert_eq!(
            &b[..],
            &[0, 0x20, 0, 0, 0, 0, 0, 0, 64, 0, 1, 0, 0, 0, 0, 0]
        );
        assert!(!d.done());
        assert_eq!(d.buf(), Iova::new(0x2000));
        let wb = TxDescriptor {
            status: (TxStatus::DD | TxStatus::ERR).bits(),
            error: TxError::BadPort.raw(),
            ..d
        };
        assert!(wb.done());
        assert_eq!(wb.error(), Ok(TxError::BadPort));
        assert_eq!(wb.ownership_word(), 0x0000_0203);
        assert_eq!(TxDescriptor::from_bytes(&wb.to_bytes()), wb);
        let mut raw = [0u8; 16];
        for (i, x) in raw.iter_mut().enumerate() {
            *x = u8::try_from(200 + i).expect("small");
        }
        let t = TxDescriptor::from_bytes(&raw);
        assert_eq!(t.to_bytes(), raw);
        assert_eq!(t.error(), Err(Error::UnknownTxError { value: 213 }));
    }
}
