//! Why iOS stopped a phone's provider, as its goodbye says (`Goodbye.provider_stop_reason`,
//! Apple's `NEProviderStopReason` case names), and what the server makes of it: a stop for a
//! network reason means the phone left the Wi-Fi, which is not a fault.

/// Apple's `NEProviderStopReason` cases, as Swift spells them (`NEProvider.h`, raw values 0 to
/// 17; the SDK side is `nepush_provider::NEProviderStopReason`). Only these become labels
/// and dashboard values, so a device cannot grow them.
pub(crate) const KNOWN: [&str; 18] = [
    "none",
    "userInitiated",
    "providerFailed",
    "noNetworkAvailable",
    "unrecoverableNetworkChange",
    "providerDisabled",
    "authenticationCanceled",
    "configurationFailed",
    "idleTimeout",
    "configurationDisabled",
    "configurationRemoved",
    "superceded",
    "userLogout",
    "userSwitch",
    "connectionFailed",
    "sleep",
    "appUpdate",
    "internalError",
];

/// The name a goodbye gave, as kept: a known case; `unknown` for anything else (a newer iOS,
/// or junk); empty when none was given (other hosts, older SDKs).
pub(crate) fn parse(name: &str) -> &'static str {
    match name {
        "" => "",
        _ => KNOWN.iter().find(|k| **k == name).copied().unwrap_or("unknown"),
    }
}

/// The name in a session's end reason, as `session::core::CloseReason` writes it
/// (`device goodbye: GOODBYE_REASON_CLIENT_STOPPING (iOS: noNetworkAvailable)`); empty if none.
pub(crate) fn in_reason(reason: &str) -> &'static str {
    reason
        .strip_prefix("device goodbye: ")
        .and_then(|r| r.split_once(" (iOS: "))
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .map_or("", parse)
}

/// Whether iOS stopped the provider because the phone left the matching network (or it
/// changed for good): the phone left the Wi-Fi.
pub(crate) fn is_network(name: &str) -> bool {
    matches!(name, "noNetworkAvailable" | "unrecoverableNetworkChange")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_only_when_known() {
        assert_eq!(parse("noNetworkAvailable"), "noNetworkAvailable");
        assert_eq!(parse("superceded"), "superceded");
        assert_eq!(parse(""), "");
        assert_eq!(parse("rm -rf /"), "unknown");
        assert_eq!(parse(&"x".repeat(10_000)), "unknown");
    }

    #[test]
    fn the_name_is_read_back_from_the_end_reason() {
        let r = "device goodbye: GOODBYE_REASON_CLIENT_STOPPING (iOS: unrecoverableNetworkChange)";
        assert_eq!(in_reason(r), "unrecoverableNetworkChange");
        assert!(is_network(in_reason(r)));
        assert_eq!(in_reason("device goodbye: GOODBYE_REASON_CLIENT_STOPPING"), "");
        assert_eq!(in_reason("heartbeat timeout"), "");
        assert!(!is_network("superceded"));
    }
}
