//! The ctoffload gRPC/protobuf API (`ctoffload.v1`).
//!
//! Not written yet: the `.proto` files and generated code arrive with the API issue.
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]
