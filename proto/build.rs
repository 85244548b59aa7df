//! Generates the `ctoffload.v1` messages and services with prost/tonic, using the
//! `protoc` binary vendored by `protoc-bin-vendored` (no download at build time).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // `std::env::set_var("PROTOC", ..)` is unsafe in edition 2024 (and this crate
    // forbids unsafe): hand the path to prost-build's config instead.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["proto/ctoffload/v1/ctoffload.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
