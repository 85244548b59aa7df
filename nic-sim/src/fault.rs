//! Fault injection, driven from tests (device.md section 19).
//!
//! A [`FaultHandle`] is a cheap, cloneable, thread-safe request queue: a test arms faults
//! from any thread, and the device applies them at its next poll. Every fault produces
//! a behaviour the specification allows (or, for [`FaultHandle::drop_completions`], the
//! one deliberate exception documented in device.md section 19).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ctoffload_hw_regs::{FatalCode, FatalUnit};

/// Faults requested but not yet taken over by the device.
#[derive(Debug, Default)]
pub(crate) struct Requests {
    pub(crate) clear: bool,
    pub(crate) drop_completions: u32,
    pub(crate) device_error: u32,
    pub(crate) table_full_at: Option<Option<u32>>,
    pub(crate) fatal: Option<(u32, u32)>,
    pub(crate) spontaneous_reset: bool,
    pub(crate) preload: Vec<(u32, u32, u64)>,
    pub(crate) slow_commands: Option<u64>,
    /// The arming sequence number of the newest request in this batch.
    pub(crate) seq: u64,
}

#[derive(Debug, Default)]
struct Shared {
    pending: AtomicBool,
    requests: Mutex<Requests>,
    /// Requests armed so far (incremented under the `requests` lock).
    armed: AtomicU64,
    /// The newest `armed` value whose requests the device has applied.
    applied: AtomicU64,
}

/// Arms faults on a [`crate::Simulator`]; applied at its next poll.
#[derive(Debug, Clone, Default)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl FaultHandle {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn arm(&self, f: impl FnOnce(&mut Requests)) {
        let mut r = self.lock();
        f(&mut r);
        r.seq = self.shared.armed.fetch_add(1, Ordering::AcqRel) + 1;
        drop(r);
        // Release: the poll that sees `pending` also sees the requests (it takes the
        // lock anyway; the flag only spares it the lock when nothing is armed).
        self.shared.pending.store(true, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Requests> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the armed requests, if any (device side).
    pub(crate) fn take(&self) -> Option<Requests> {
        if !self.shared.pending.swap(false, Ordering::Acquire) {
            return None;
        }
        Some(std::mem::take(&mut *self.lock()))
    }

    /// Records that the device applied every request up to `seq` (device side).
    pub(crate) fn mark_applied(&self, seq: u64) {
        // Release: a test that sees `applied` also sees the device state the faults
        // changed (the device's own state is behind its own synchronisation anyway).
        self.shared.applied.fetch_max(seq, Ordering::Release);
    }

    /// Waits until the device has applied every fault armed before this call, or
    /// `timeout` passes; `true` when they were applied. The device applies faults at
    /// the start of a poll, so a command posted after this returns `true` sees them;
    /// only meaningful while something (a [`crate::SimThread`]) polls the device.
    pub fn wait_applied(&self, timeout: Duration) -> bool {
        let target = self.shared.armed.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        loop {
            if self.shared.applied.load(Ordering::Acquire) >= target {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Command timeout: the next `n` commands are consumed and take effect, but their
    /// completion is never written (as if the completion write were lost).
    pub fn drop_completions(&self, n: u32) {
        self.arm(|r| r.drop_completions = r.drop_completions.saturating_add(n));
    }

    /// The next `n` commands complete with `DEVICE_ERROR` and have no effect.
    pub fn device_error_next(&self, n: u32) {
        self.arm(|r| r.device_error = r.device_error.saturating_add(n));
    }

    /// Inserts return `TABLE_FULL` once the table holds `fill` entries (the effective
    /// limit is `min(FLOW_LIMIT, fill)`; the `FLOW_LIMIT` register is unchanged).
    pub fn table_full_at(&self, fill: u32) {
        self.arm(|r| r.table_full_at = Some(Some(fill)));
    }

    /// Enters the fatal state with this code and unit (`FATAL_ADDR` = 0).
    pub fn fatal(&self, code: FatalCode, unit: FatalUnit) {
        self.fatal_raw(code.raw(), unit.raw());
    }

    /// Enters the fatal state with raw code and unit values (reserved ones included).
    pub fn fatal_raw(&self, code: u32, unit: u32) {
        self.arm(|r| r.fatal = Some((code, unit)));
    }

    /// A device-internal reset: table lost, `RESET_COUNT` + 1, `RESET_DONE` cause.
    pub fn spontaneous_reset(&self) {
        self.arm(|r| r.spontaneous_reset = true);
    }

    /// Sets an installed flow's counters so that the next hit wraps both: packets =
    /// `2^32 − 1`, bytes = `2^48 − 1`.
    pub fn counter_wrap_soon(&self, flow_id: u32) {
        self.preload_counters(flow_id, u32::MAX, (1 << 48) - 1);
    }

    /// Sets an installed flow's packet and byte counters (ignored for an empty slot).
    pub fn preload_counters(&self, flow_id: u32, packets: u32, bytes: u64) {
        self.arm(|r| r.preload.push((flow_id, packets, bytes)));
    }

    /// Each command takes `delay_ns` of model time (0 = as fast as possible). A delay
    /// over the 50 ms watchdog makes the device fatal with `CMD_HANG`.
    pub fn slow_commands(&self, delay_ns: u64) {
        self.arm(|r| r.slow_commands = Some(delay_ns));
    }

    /// Disarms every fault (pending counts, table-full fill, slow commands).
    pub fn clear(&self) {
        self.arm(|r| {
            *r = Requests {
                clear: true,
                ..Requests::default()
            };
        });
    }
}
