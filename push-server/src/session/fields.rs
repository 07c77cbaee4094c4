//! What a device may put in the fields the server keeps, logs or shows (Hello, NetworkChange).
//! A frame that breaks these ends the session with `Goodbye{PROTOCOL_ERROR}` naming the field,
//! before anything is stored: a phone cannot make the registry, the dashboard or the logs hold
//! kilobytes of text per device.

use push_proto::device::Hello;

use crate::config::MAX_SSID_BYTES;

/// Longest `Hello.instance_id` (the SDK sends a UUID, 36 bytes).
pub const MAX_INSTANCE_ID_BYTES: usize = 64;
/// Longest `Hello.sdk_version` (the SDK sends "mobile-sdk/<semver>").
pub const MAX_SDK_VERSION_BYTES: usize = 64;

/// The fields of a hello the server keeps, or why they are refused.
pub fn check_hello(hello: &Hello) -> Result<(), String> {
    check_ssid(&hello.ssid)?;
    check_text("instance_id", &hello.instance_id, MAX_INSTANCE_ID_BYTES)?;
    check_text("sdk_version", &hello.sdk_version, MAX_SDK_VERSION_BYTES)
}

/// An SSID: at most 32 bytes (IEEE 802.11); empty means unknown. Any other content is allowed,
/// as broadcast (a real network may use characters a log would escape).
pub fn check_ssid(ssid: &str) -> Result<(), String> {
    if ssid.len() > MAX_SSID_BYTES {
        return Err(format!(
            "ssid is {} bytes; an SSID has at most {MAX_SSID_BYTES}",
            ssid.len()
        ));
    }
    Ok(())
}

/// A call id a device names (`CallOutcomeReport.call_id`): as senders choose them, at most 128
/// bytes without control characters, and not empty.
pub fn check_call_id(call_id: &str) -> Result<(), String> {
    if call_id.is_empty() {
        return Err("call_id is empty".into());
    }
    check_text("call_id", call_id, 128)
}

/// Short text without control characters (may be empty).
fn check_text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes; at most {max} are allowed",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} contains control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(ssid: &str, instance_id: &str, sdk_version: &str) -> Hello {
        Hello {
            ssid: ssid.into(),
            instance_id: instance_id.into(),
            sdk_version: sdk_version.into(),
            ..Hello::default()
        }
    }

    #[test]
    fn real_hellos_pass() {
        let id = "3f0e7a9c-2b1d-4c5e-8f6a-7b8c9d0e1f2a";
        check_hello(&hello("Station Ünfall 🚑", id, "mobile-sdk/0.1.0")).unwrap();
        check_hello(&hello("", "", "")).unwrap();
        // 32 bytes of multi-byte characters.
        check_hello(&hello("ÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄ", id, "x")).unwrap();
    }

    #[test]
    fn long_or_control_fields_are_refused_naming_the_field() {
        for (h, needle) in [
            (hello(&"s".repeat(3000), "i", "v"), "ssid is 3000 bytes"),
            (hello("ÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄX", "i", "v"), "ssid is 33 bytes"),
            (hello("w", &"i".repeat(65), "v"), "instance_id is 65 bytes"),
            (hello("w", "i", &"v".repeat(10_000)), "sdk_version is 10000 bytes"),
            (hello("w", "i\n", "v"), "instance_id contains control"),
            (hello("w", "i", "v\u{1b}[31m"), "sdk_version contains control"),
        ] {
            let err = check_hello(&h).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
