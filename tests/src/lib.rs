//! Shared helpers for ctoffload's cross-crate and end-to-end tests.
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]
