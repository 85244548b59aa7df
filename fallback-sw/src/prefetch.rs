//! A cache-line prefetch hint.
//!
//! A plain load that misses the cache blocks the retirement of every instruction after
//! it until its line arrives, so a batch that "prefetches" with loads overlaps only the
//! misses it issues back to back. A prefetch instruction does not wait for its line
//! (on this machine's cores it waits only for the address translation, a page walk
//! when the TLB misses): the batch issues the misses of all its packets and goes on
//! working while they are in flight.
//! The instruction comes from `safe_arch` (the crate has no `unsafe` of its own); on
//! other architectures the hint is a no-op.

/// Ask for the cache line holding `r` in every cache level, without waiting for it.
/// A hint only: it changes no value and never faults.
#[inline(always)]
pub(crate) fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    safe_arch::prefetch_t0(r);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}
