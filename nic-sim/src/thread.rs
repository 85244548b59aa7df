//! Running the model in a background thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::device::{SimStats, Simulator};
use crate::fault::FaultHandle;

/// Where a background simulator takes its time from.
#[derive(Debug, Clone)]
pub enum SimClock {
    /// Nanoseconds since the thread started (monotonic clock).
    Monotonic,
    /// A value the test advances by hand.
    Manual(Arc<AtomicU64>),
}

/// How long after the last poll that found work the thread keeps polling (spinning,
/// then yielding between polls), so that a driver submitting batches back to back finds
/// it awake. After that it sleeps between polls.
const SPIN_WINDOW: Duration = Duration::from_micros(200);
/// Idle polls spent spinning before the thread yields between polls.
const SPIN_POLLS: u32 = 64;
/// Sleep between idle polls once the spin window has passed.
const IDLE_SLEEP: Duration = Duration::from_micros(30);

#[derive(Debug, Default)]
struct Control {
    stop: AtomicBool,
    flr: AtomicBool,
    stats: Mutex<SimStats>,
}

/// A simulator polled by a background thread. [`SimThread::stop`] gives it back.
#[derive(Debug)]
pub struct SimThread {
    control: Arc<Control>,
    faults: FaultHandle,
    handle: JoinHandle<Simulator>,
}

impl Simulator {
    /// Runs [`Simulator::poll`] in a background thread: it polls without pause while
    /// there is work, spins for a few more polls, then yields between polls until
    /// 200 µs after the last work, then sleeps about 30 µs between polls until work
    /// shows up again.
    pub fn spawn(mut self, clock: SimClock) -> SimThread {
        let control = Arc::new(Control::default());
        let faults = self.faults();
        let c = Arc::clone(&control);
        let handle = std::thread::Builder::new()
            .name("ctoffload-nic-sim".into())
            .spawn(move || {
                let start = Instant::now();
                let now = || match &clock {
                    SimClock::Monotonic => {
                        u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
                    }
                    SimClock::Manual(t) => t.load(Ordering::Acquire),
                };
                let mut idle = 0u32;
                let mut idle_since = Instant::now();
                let mut published = self.stats();
                *c.stats.lock().unwrap_or_else(PoisonError::into_inner) = published;
                while !c.stop.load(Ordering::Acquire) {
                    if c.flr.swap(false, Ordering::AcqRel) {
                        self.flr(now());
                    }
                    let work = self.poll(now());
                    // Take the lock only when a figure changed (not on every idle poll).
                    let stats = self.stats();
                    if stats != published {
                        published = stats;
                        *c.stats.lock().unwrap_or_else(PoisonError::into_inner) = stats;
                    }
                    if work > 0 {
                        idle = 0;
                        idle_since = Instant::now();
                        continue;
                    }
                    idle = idle.saturating_add(1);
                    // Spin briefly, then poll with a yield in between (the core goes to
                    // whoever needs it, e.g. the driver's thread when both share one),
                    // and once the window has passed, sleep between polls.
                    if idle <= SPIN_POLLS {
                        std::hint::spin_loop();
                    } else if idle_since.elapsed() < SPIN_WINDOW {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(IDLE_SLEEP);
                    }
                }
                self
            })
            .unwrap_or_else(|e| panic!("cannot spawn the simulator thread: {e}"));
        SimThread {
            control,
            faults,
            handle,
        }
    }
}

impl SimThread {
    /// Stops the thread and returns the simulator.
    pub fn stop(self) -> Simulator {
        self.control.stop.store(true, Ordering::Release);
        match self.handle.join() {
            Ok(sim) => sim,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// The fault-injection handle.
    pub fn faults(&self) -> FaultHandle {
        self.faults.clone()
    }

    /// The simulator's statistics as of its last poll.
    pub fn stats(&self) -> SimStats {
        *self
            .control
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for a function-level reset at the next poll.
    pub fn request_flr(&self) {
        self.control.flr.store(true, Ordering::Release);
    }
}
