//! Generates the prost types (always) and the tonic sender and APNs bridge APIs (feature `grpc`).
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps fresh machines free of a system package.
    if env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto");
    let grpc = env::var_os("CARGO_FEATURE_GRPC").is_some();
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let files: &[&str] = if grpc {
        &["proto/device.proto", "proto/sender.proto", "proto/apns.proto"]
    } else {
        &["proto/device.proto"]
    };
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .build_transport(false)
        .file_descriptor_set_path(out.join("lpush_descriptor.bin"))
        .compile_protos(files, &["proto"])?;
    Ok(())
}
