#!/usr/bin/env bash
# Builds the Swift package LpushSDK that the container app and the push provider extension
# import: LpushFFI.xcframework (the Rust library mobile-sdk-ffi, which holds mobile-sdk and the
# provider core, for iOS devices and both simulators) plus the Swift binding uniffi generates
# from it. Run on macOS with Xcode and rustup; not run in this repository's CI (Linux).
#
#   nepush-provider/ios/build-xcframework.sh [out-dir]      # default: target/LpushSDK
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-target/LpushSDK}"
lib=libmobile_sdk_ffi.a
device=aarch64-apple-ios
simulators=(aarch64-apple-ios-sim x86_64-apple-ios)

rustup target add "$device" "${simulators[@]}"
for target in "$device" "${simulators[@]}"; do
    # A static library for iOS without making every Linux build produce one too.
    cargo rustc --locked --release -p mobile-sdk-ffi --lib --target "$target" --crate-type staticlib
done

rm -rf "$out" && mkdir -p "$out/Sources/LpushSDK" "$out/headers" "$out/sim"
# The binding, generated from a host build of the same crate (library mode reads its metadata).
cargo build --locked --release -p mobile-sdk-ffi --lib
cargo run --locked --release -p mobile-sdk-ffi --bin uniffi-bindgen -- generate \
    --library target/release/libmobile_sdk_ffi.dylib --language swift --out-dir "$out/gen"
mv "$out/gen/mobile_sdk_ffi.swift" "$out/Sources/LpushSDK/"
mv "$out/gen/mobile_sdk_ffiFFI.h" "$out/headers/"
mv "$out/gen/mobile_sdk_ffiFFI.modulemap" "$out/headers/module.modulemap"

# One simulator library for both architectures (an xcframework takes one per platform).
lipo -create "target/${simulators[0]}/release/$lib" "target/${simulators[1]}/release/$lib" \
    -output "$out/sim/$lib"
xcodebuild -create-xcframework \
    -library "target/$device/release/$lib" -headers "$out/headers" \
    -library "$out/sim/$lib" -headers "$out/headers" \
    -output "$out/LpushFFI.xcframework"

cat > "$out/Package.swift" <<'SWIFT'
// swift-tools-version:5.9
import PackageDescription

let package = Package(
    name: "LpushSDK",
    platforms: [.iOS(.v15)],
    products: [.library(name: "LpushSDK", targets: ["LpushSDK"])],
    targets: [
        .binaryTarget(name: "LpushFFI", path: "LpushFFI.xcframework"),
        .target(name: "LpushSDK", dependencies: ["LpushFFI"], path: "Sources/LpushSDK"),
    ]
)
SWIFT
echo "LpushSDK written to $out: add it to the app and extension targets as a local package."
