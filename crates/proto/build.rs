//! Compiles `proto/fhirmesh/v1/*.proto` with tonic-prost-build (messages, clients and servers),
//! using the vendored `protoc` so a fresh machine needs nothing but cargo.

use std::path::PathBuf;

const PROTOS: [&str; 5] = ["common.proto", "resource.proto", "events.proto", "binary.proto", "export.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let protos: Vec<PathBuf> = PROTOS.iter().map(|name| proto_root.join("fhirmesh/v1").join(name)).collect();
    let includes = [proto_root.clone(), protoc_bin_vendored::include_path()?];

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    println!("cargo:rerun-if-changed={}", proto_root.join("fhirmesh/v1").display());
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Resource bodies can be megabytes: share the receive buffer instead of copying into Vec<u8>.
        .bytes(".")
        .compile_with_config(config, &protos, &includes)?;
    Ok(())
}
