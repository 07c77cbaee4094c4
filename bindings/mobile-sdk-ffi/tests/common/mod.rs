//! Generating a binding from the built library, as the Swift build script does (library mode).

use std::path::{Path, PathBuf};

/// File name of the cdylib on this platform.
pub fn library_file() -> &'static str {
    if cfg!(target_os = "macos") {
        "libmobile_sdk_ffi.dylib"
    } else {
        "libmobile_sdk_ffi.so"
    }
}

/// Generate the `language` binding into `out` from the built cdylib; returns the library used.
pub fn generate_binding(out: &Path, language: &str) -> PathBuf {
    let bindgen = Path::new(env!("CARGO_BIN_EXE_uniffi-bindgen"));
    // `cargo test` builds the cdylib into deps/ without copying it up (`cargo build` does):
    // take the newer of the two, so a stale copy from an earlier build is never used.
    let dir = bindgen.parent().unwrap();
    let library = [dir.join("deps").join(library_file()), dir.join(library_file())]
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .expect("the mobile-sdk-ffi cdylib was not built");
    let status = std::process::Command::new(bindgen)
        .args([
            "generate",
            "--library",
            "--language",
            language,
            "--no-format",
            "--out-dir",
        ])
        .arg(out)
        .arg(&library)
        .status()
        .expect("run uniffi-bindgen");
    assert!(status.success(), "uniffi-bindgen failed: {status}");
    library
}
