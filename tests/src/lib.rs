//! Shared helpers for ctoffload's cross-crate and end-to-end tests.
//!
//! - [`netns`]: network namespaces with a deleting guard, bounded helper commands,
//!   entering a namespace from a thread.
//! - [`frames`]: Ethernet frames with correct checksums (built with etherparse).
//! - [`kernel`]: reading Linux conntrack state (`conntrack -L`) and nftables counters.
//! - [`kernel_router`]: the kernel router (three namespaces) of the differential tests.
//! - [`inject`]: sending raw frames into an interface of a namespace.
//! - [`capture`]: receiving the raw frames that arrive on an interface of a namespace.
//! - [`topology`]: the inside / gateway / outside namespaces of the end-to-end tests
//!   and the comparison benchmark, with their clients and servers.
//! - [`qemu`]: the QEMU guest test of the VFIO backend (packages, initramfs, guest,
//!   ivshmem server, simulator behind the BAR).
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

pub mod capture;
pub mod frames;
pub mod inject;
pub mod kernel;
pub mod kernel_router;
pub mod netns;
pub mod qemu;
pub mod topology;
