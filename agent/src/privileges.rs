//! Least privilege after setup.
//!
//! Once the agent has bound its sockets and opened its devices, it keeps only the
//! capabilities its backend still needs at run time and gives up every other one for
//! good, on every thread of the process:
//!
//! | backend | capabilities kept | why |
//! | --- | --- | --- |
//! | `sim` | none | the simulated NIC is memory in this process |
//! | `software` | `CAP_NET_RAW`, `CAP_NET_ADMIN` | AF_PACKET sockets and promiscuous mode on the ports (re-opened when a link comes back) |
//! | `vfio` | `CAP_IPC_LOCK` | DMA mappings pin memory beyond `RLIMIT_MEMLOCK`; the VFIO group and container are already open file descriptors |
//!
//! On each thread: `SECBIT_NOROOT` and `SECBIT_NO_SETUID_FIXUP` are set and locked (uid
//! 0 gets no capabilities back from an `execve`), every capability outside the kept set
//! leaves the bounding set, the ambient set is cleared, the effective and permitted sets
//! become the kept set (the inheritable set empty), and `no_new_privs` is set.
//!
//! Capabilities belong to threads, not to the process (capset(2) changes the calling
//! thread only), and this crate does no unsafe work, so no signal can make other
//! threads drop theirs (what libcap's psx does). The drop runs on the calling thread
//! (the main thread, which runs the API servers) and on every worker thread of the
//! current tokio runtime (one task pinned to each, see [`drop_after_setup`]); threads
//! created afterwards inherit the reduced sets. Threads created before by other code
//! (the simulator's and dataplane worker threads of `backend = "sim"`) keep theirs: the
//! report lists them and a warning names them (see docs/reliability.md).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::thread::{CapabilitiesSecureBits, CapabilitySet, CapabilitySets};

use crate::config::Backend;

/// `CAP_NET_ADMIN`.
pub const CAP_NET_ADMIN: u32 = 12;
/// `CAP_NET_RAW`.
pub const CAP_NET_RAW: u32 = 13;
/// `CAP_IPC_LOCK`.
pub const CAP_IPC_LOCK: u32 = 14;
/// `CAP_SETPCAP` (needed for the bounding set and securebits, then dropped).
const CAP_SETPCAP: u32 = 8;

/// How long the runtime's worker threads get to take their drop task.
const WORKERS_WAIT: Duration = Duration::from_secs(5);

/// Capabilities `backend` keeps after setup (see the module table).
#[must_use]
pub fn kept_capabilities(backend: &Backend) -> &'static [u32] {
    match backend {
        Backend::Sim { .. } => &[],
        Backend::Software { .. } => &[CAP_NET_RAW, CAP_NET_ADMIN],
        Backend::Vfio { .. } => &[CAP_IPC_LOCK],
    }
}

/// The set as the kernel's 64-bit mask.
#[must_use]
pub fn mask_of(caps: &[u32]) -> u64 {
    caps.iter()
        .filter(|&&c| c < 64)
        .fold(0, |m, &c| m | (1u64 << c))
}

/// Why the privileges could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Syscall {
        /// Which step.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Not every runtime worker thread took its drop task in time.
    #[error("{done} of {workers} runtime worker threads dropped their capabilities")]
    Workers {
        /// Threads that dropped.
        done: usize,
        /// Worker threads of the runtime.
        workers: usize,
    },
}

fn sys(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> PrivilegeError {
    move |e| PrivilegeError::Syscall {
        what,
        source: e.into(),
    }
}

/// A thread that still holds capabilities beyond the kept set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Thread id.
    pub tid: i32,
    /// Thread name (`comm`).
    pub name: String,
    /// Its effective set.
    pub effective: u64,
}

/// What was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropReport {
    /// The kept set's mask.
    pub kept: u64,
    /// Threads that dropped (the caller and the runtime's workers).
    pub threads: usize,
    /// Threads created before by other code that still hold more than the kept set.
    pub holders: Vec<Holder>,
}

/// Drops every capability but `keep` on the calling thread, for good, and sets
/// `no_new_privs`: securebits `NOROOT` and `NO_SETUID_FIXUP` locked (when allowed),
/// the bounding set reduced to `keep`, the ambient set cleared, effective = permitted
/// = `keep` (as far as it was held), inheritable empty.
pub fn drop_this_thread(keep: &[u32]) -> Result<(), PrivilegeError> {
    use rustix::thread as t;
    let kept = CapabilitySet::from_bits_retain(mask_of(keep));
    let setpcap = CapabilitySet::from_bits_retain(1 << CAP_SETPCAP);
    if t::capability_is_in_bounding_set(setpcap).unwrap_or(false)
        && t::capabilities(None)
            .map_err(sys("capget"))?
            .effective
            .contains(setpcap)
    {
        t::set_capabilities_secure_bits(
            CapabilitiesSecureBits::NO_ROOT
                | CapabilitiesSecureBits::NO_ROOT_LOCKED
                | CapabilitiesSecureBits::NO_SETUID_FIXUP
                | CapabilitiesSecureBits::NO_SETUID_FIXUP_LOCKED,
        )
        .map_err(sys("securebits"))?;
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(40)
            .min(63);
        for cap in (0..=last).filter(|c| !kept.bits() & (1 << c) != 0) {
            match t::remove_capability_from_bounding_set(CapabilitySet::from_bits_retain(1 << cap))
            {
                // EINVAL: a capability this kernel does not know.
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                Err(e) => return Err(sys("bounding set")(e)),
            }
        }
    }
    match t::clear_ambient_capability_set() {
        // EINVAL: no ambient capabilities on this kernel (before 4.3).
        Ok(()) | Err(rustix::io::Errno::INVAL) => {}
        Err(e) => return Err(sys("ambient set")(e)),
    }
    let cur = t::capabilities(None).map_err(sys("capget"))?;
    let held = cur.permitted & kept;
    t::set_capabilities(
        None,
        CapabilitySets {
            effective: held,
            permitted: held,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(sys("capset"))?;
    t::set_no_new_privs(true).map_err(sys("no_new_privs"))
}

/// A hex field (`CapEff:`, ...) of a `/proc/.../status` text.
#[must_use]
pub fn status_mask(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    u64::from_str_radix(line[field.len()..].trim(), 16).ok()
}

/// Threads of this process whose effective set goes beyond `kept`.
fn holders(kept: u64) -> Vec<Holder> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue; // ended meanwhile
        };
        let effective = status_mask(&status, "CapEff:").unwrap_or(0);
        if effective & !kept != 0 {
            let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.push(Holder {
                tid,
                name: name.trim().to_owned(),
                effective,
            });
        }
    }
    out
}

/// Runs [`drop_this_thread`] on every worker thread of the current tokio runtime: one
/// blocking-wait task per worker, each waiting (bounded) until all have run, so that no
/// worker takes two. Returns how many threads dropped.
async fn drop_on_runtime_workers(keep: &'static [u32]) -> Result<usize, PrivilegeError> {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return Ok(0);
    };
    if rt.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Ok(0);
    }
    let workers = rt.metrics().num_workers();
    let seen: Arc<Mutex<(HashSet<std::thread::ThreadId>, Option<PrivilegeError>)>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let seen = Arc::clone(&seen);
        tasks.push(tokio::spawn(async move {
            let r = drop_this_thread(keep);
            let me = std::thread::current().id();
            {
                let mut g = seen.lock().unwrap_or_else(PoisonError::into_inner);
                g.0.insert(me);
                if let Err(e) = r {
                    g.1 = Some(e);
                }
            }
            // Hold this worker until every worker has taken a task.
            let t0 = Instant::now();
            while seen.lock().unwrap_or_else(PoisonError::into_inner).0.len() < workers
                && t0.elapsed() < WORKERS_WAIT
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut g = seen.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(e) = g.1.take() {
        return Err(e);
    }
    if g.0.len() < workers {
        return Err(PrivilegeError::Workers {
            done: g.0.len(),
            workers,
        });
    }
    Ok(workers)
}

/// Drops every capability but `keep` on the calling thread and on the current tokio
/// runtime's worker threads (module doc), and reports the threads that still hold more.
pub async fn drop_all_but(keep: &'static [u32]) -> Result<DropReport, PrivilegeError> {
    drop_this_thread(keep)?;
    let workers = drop_on_runtime_workers(keep).await?;
    let kept = mask_of(keep);
    Ok(DropReport {
        kept,
        threads: workers + 1,
        holders: holders(kept),
    })
}

/// The agent's call after setup: keeps what `backend` needs (module table) and logs the
/// result; a failure is logged as an error (the agent keeps running with what it has).
pub async fn drop_after_setup(backend: &Backend) {
    let keep = kept_capabilities(backend);
    match drop_all_but(keep).await {
        Ok(r) => {
            tracing::info!(
                kept = format_args!("{:#x}", r.kept),
                threads = r.threads,
                "privileges dropped: {}, no_new_privs set",
                names(keep)
            );
            for h in &r.holders {
                tracing::warn!(
                    tid = h.tid,
                    thread = %h.name,
                    effective = format_args!("{:#x}", h.effective),
                    "thread started before the drop keeps its capabilities"
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot drop privileges"),
    }
}

fn names(caps: &[u32]) -> String {
    if caps.is_empty() {
        return "no capability kept".into();
    }
    let name = |c: &u32| match *c {
        CAP_NET_ADMIN => "CAP_NET_ADMIN",
        CAP_NET_RAW => "CAP_NET_RAW",
        CAP_IPC_LOCK => "CAP_IPC_LOCK",
        _ => "other",
    };
    let v: Vec<&str> = caps.iter().map(name).collect();
    format!("kept {}", v.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_sets_follow_the_backend() {
        assert_eq!(
            mask_of(kept_capabilities(&Backend::Sim {
                table_size: None,
                interfaces: vec![],
                sim_socket: None,
            })),
            0
        );
        assert_eq!(
            mask_of(kept_capabilities(&Backend::Software {
                interfaces: vec![],
                io: crate::config::PacketIo::AfPacket,
                af_xdp: crate::port::af_xdp::AfXdpConfig::default(),
            })),
            (1 << 12) | (1 << 13)
        );
        assert_eq!(
            mask_of(kept_capabilities(&Backend::Vfio { pci: String::new() })),
            1 << 14
        );
    }

    #[test]
    fn status_fields_parse() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000003000\nNoNewPrivs:\t1\n";
        assert_eq!(status_mask(s, "CapEff:"), Some(0x3000));
        assert_eq!(status_mask(s, "NoNewPrivs:"), Some(1));
        assert_eq!(status_mask(s, "CapBnd:"), None);
    }
}
