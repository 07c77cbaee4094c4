//! Wire protocol between devices and the push-server, and the sender API.
//!
//! # Layout
//! - [`device`]: prost types of the device protocol (`proto/device.proto`, package `lpush.device.v1`).
//! - [`frame`]: the length-delimited frame codec. Pure functions over buffers; does no I/O.
//! - [`provider_keys`]: the keys of the provider's `providerConfiguration` dictionary.
//! - [`sender`] (feature `grpc`): the tonic sender and admin API (`proto/sender.proto`).
//! - [`apns`] (feature `grpc`): the APNs bridge API (`proto/apns.proto`), between a push-server
//!   and an apns-bridge running on another host.
//!
//! This crate depends on neither tokio nor any TLS stack, so the SDK can use it inside the iOS
//! extension and fuzzers can drive the codec directly.
//!
//! # Dependencies
//! Depends on no crate of the workspace. Everything else depends on it, so it must not depend on
//! tokio, a TLS stack or any server code (tonic only behind `grpc`).
#![warn(missing_docs, unreachable_pub)]

pub mod frame;
pub mod provider_keys;

/// Generated code, nested as the proto packages are (cross-package references need it).
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod lpush {
    /// `lpush.device.*`
    pub mod device {
        /// `lpush.device.v1`
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/lpush.device.v1.rs"));
        }
    }
    /// `lpush.sender.*`
    #[cfg(feature = "grpc")]
    pub mod sender {
        /// `lpush.sender.v1`
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/lpush.sender.v1.rs"));
        }
    }
    /// `lpush.apns.*`
    #[cfg(feature = "grpc")]
    pub mod apns {
        /// `lpush.apns.v1`
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/lpush.apns.v1.rs"));
        }
    }
}

/// APNs bridge gRPC API (`lpush.apns.v1`).
#[cfg(feature = "grpc")]
pub use lpush::apns::v1 as apns;
/// Device protocol messages (`lpush.device.v1`).
pub use lpush::device::v1 as device;
/// Sender and admin gRPC API (`lpush.sender.v1`).
#[cfg(feature = "grpc")]
pub use lpush::sender::v1 as sender;

/// Encoded `FileDescriptorSet` of every compiled proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lpush_descriptor.bin"));

/// TLS ALPN protocol identifier of device protocol version 1.
pub const ALPN: &[u8] = b"lpush/1";

/// Namespace of call UUIDs (UUIDv5 over the call id).
const CALL_UUID_NAMESPACE: uuid::Uuid = uuid::uuid!("5b1f0c1e-6a53-4c5e-9d0f-6c6f63616c70");

/// The CallKit UUID of a call: the same on the local path, the APNs path and in the app, so a
/// device that hears about a call twice rings once.
pub fn call_uuid(call_id: &str) -> String {
    uuid::Uuid::new_v5(&CALL_UUID_NAMESPACE, call_id.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn call_uuid_is_stable_and_distinct() {
        assert_eq!(super::call_uuid("c1"), super::call_uuid("c1"));
        assert_ne!(super::call_uuid("c1"), super::call_uuid("c2"));
        assert_eq!(super::call_uuid("c1").len(), 36);
    }
}
