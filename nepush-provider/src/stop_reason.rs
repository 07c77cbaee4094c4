//! `NEProviderStopReason`, mirrored with Apple's raw values, and what each means to the SDK.

use mobile_sdk::core::{HostStop, StopReason};

/// Why iOS stops the provider (`stop(with:completionHandler:)`): every case of Apple's
/// `NEProviderStopReason`, with its raw value (`NEProvider.h`: `NSInteger`, 0 to 17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i64)]
pub enum NEProviderStopReason {
    /// No specific reason.
    None = 0,
    /// The user stopped the provider.
    UserInitiated = 1,
    /// The provider failed.
    ProviderFailed = 2,
    /// There is no network connectivity (for an app push provider: the device left the
    /// matching Wi-Fi).
    NoNetworkAvailable = 3,
    /// The device attached to a new network. Field reports: also given while the device is
    /// still on the same Wi-Fi, when the user switches apps.
    UnrecoverableNetworkChange = 4,
    /// The provider was disabled.
    ProviderDisabled = 5,
    /// The authentication process was cancelled.
    AuthenticationCanceled = 6,
    /// The provider could not be configured.
    ConfigurationFailed = 7,
    /// The provider was idle for too long.
    IdleTimeout = 8,
    /// The associated configuration was disabled.
    ConfigurationDisabled = 9,
    /// The associated configuration was deleted.
    ConfigurationRemoved = 10,
    /// A higher-priority configuration superseded this one (Apple's spelling).
    Superceded = 11,
    /// The user logged out.
    UserLogout = 12,
    /// The current console user changed.
    UserSwitch = 13,
    /// The connection failed.
    ConnectionFailed = 14,
    /// The configuration disconnects on sleep and the device went to sleep.
    Sleep = 15,
    /// The provider is being updated.
    AppUpdate = 16,
    /// An internal error occurred in the NetworkExtension framework.
    InternalError = 17,
}

impl NEProviderStopReason {
    /// Every case, in raw-value order.
    pub const ALL: [Self; 18] = [
        Self::None,
        Self::UserInitiated,
        Self::ProviderFailed,
        Self::NoNetworkAvailable,
        Self::UnrecoverableNetworkChange,
        Self::ProviderDisabled,
        Self::AuthenticationCanceled,
        Self::ConfigurationFailed,
        Self::IdleTimeout,
        Self::ConfigurationDisabled,
        Self::ConfigurationRemoved,
        Self::Superceded,
        Self::UserLogout,
        Self::UserSwitch,
        Self::ConnectionFailed,
        Self::Sleep,
        Self::AppUpdate,
        Self::InternalError,
    ];

    /// The case with Swift's `rawValue`; `None` for a value this build does not know (a newer
    /// iOS): stop with [`StopReason::Other`] then.
    pub fn from_raw(raw: i64) -> Option<Self> {
        usize::try_from(raw).ok().and_then(|i| Self::ALL.get(i).copied())
    }

    /// Swift's `rawValue`.
    pub fn raw(self) -> i64 {
        self as i64
    }

    /// The Swift case name (`unrecoverableNetworkChange`), as scenario files write it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::UserInitiated => "userInitiated",
            Self::ProviderFailed => "providerFailed",
            Self::NoNetworkAvailable => "noNetworkAvailable",
            Self::UnrecoverableNetworkChange => "unrecoverableNetworkChange",
            Self::ProviderDisabled => "providerDisabled",
            Self::AuthenticationCanceled => "authenticationCanceled",
            Self::ConfigurationFailed => "configurationFailed",
            Self::IdleTimeout => "idleTimeout",
            Self::ConfigurationDisabled => "configurationDisabled",
            Self::ConfigurationRemoved => "configurationRemoved",
            Self::Superceded => "superceded",
            Self::UserLogout => "userLogout",
            Self::UserSwitch => "userSwitch",
            Self::ConnectionFailed => "connectionFailed",
            Self::Sleep => "sleep",
            Self::AppUpdate => "appUpdate",
            Self::InternalError => "internalError",
        }
    }

    /// The case with Swift name `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }

    /// What the SDK makes of it. All of them stop the session at once with a goodbye (when
    /// the connection still works); the reason only says why, in the goodbye's detail and the
    /// session's final state. None of them is trusted for liveness: the server's heartbeat
    /// deadline is the truth.
    pub fn sdk_reason(self) -> StopReason {
        match self {
            Self::NoNetworkAvailable => StopReason::NoNetwork,
            Self::UnrecoverableNetworkChange => StopReason::NetworkChange,
            Self::Superceded => StopReason::Superseded,
            Self::UserInitiated
            | Self::ProviderDisabled
            | Self::AuthenticationCanceled
            | Self::ConfigurationDisabled
            | Self::ConfigurationRemoved
            | Self::UserLogout
            | Self::UserSwitch
            | Self::AppUpdate => StopReason::HostRequested,
            Self::None
            | Self::ProviderFailed
            | Self::ConfigurationFailed
            | Self::IdleTimeout
            | Self::ConnectionFailed
            | Self::Sleep
            | Self::InternalError => StopReason::Other,
        }
    }
}

impl From<NEProviderStopReason> for StopReason {
    fn from(r: NEProviderStopReason) -> Self {
        r.sdk_reason()
    }
}

/// The SDK's reason, and Apple's case name for the server (its dashboard and metrics).
impl From<NEProviderStopReason> for HostStop {
    fn from(r: NEProviderStopReason) -> Self {
        Self {
            reason: r.sdk_reason(),
            provider_reason: r.name(),
        }
    }
}

impl std::fmt::Display for NEProviderStopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_are_apples() {
        for (i, r) in NEProviderStopReason::ALL.iter().enumerate() {
            assert_eq!(r.raw(), i as i64);
            assert_eq!(NEProviderStopReason::from_raw(r.raw()), Some(*r));
            assert_eq!(NEProviderStopReason::from_name(r.name()), Some(*r));
        }
        // Spot checks against the SDK headers.
        assert_eq!(NEProviderStopReason::NoNetworkAvailable.raw(), 3);
        assert_eq!(NEProviderStopReason::UnrecoverableNetworkChange.raw(), 4);
        assert_eq!(NEProviderStopReason::Superceded.raw(), 11);
        assert_eq!(NEProviderStopReason::ConnectionFailed.raw(), 14);
        assert_eq!(NEProviderStopReason::InternalError.raw(), 17);
        assert_eq!(NEProviderStopReason::from_raw(18), None);
        assert_eq!(NEProviderStopReason::from_raw(-1), None);
        assert_eq!(
            NEProviderStopReason::from_name("superseded"),
            None,
            "Apple's spelling"
        );
    }

    #[test]
    fn the_goodbye_names_the_case_as_apple_does() {
        for r in NEProviderStopReason::ALL {
            let stop = HostStop::from(r);
            assert_eq!((stop.reason, stop.provider_reason), (r.sdk_reason(), r.name()));
        }
    }

    #[test]
    fn maps_onto_sdk_stop_reasons() {
        use NEProviderStopReason as R;
        let expect = [
            (R::None, StopReason::Other),
            (R::UserInitiated, StopReason::HostRequested),
            (R::ProviderFailed, StopReason::Other),
            (R::NoNetworkAvailable, StopReason::NoNetwork),
            (R::UnrecoverableNetworkChange, StopReason::NetworkChange),
            (R::ProviderDisabled, StopReason::HostRequested),
            (R::AuthenticationCanceled, StopReason::HostRequested),
            (R::ConfigurationFailed, StopReason::Other),
            (R::IdleTimeout, StopReason::Other),
            (R::ConfigurationDisabled, StopReason::HostRequested),
            (R::ConfigurationRemoved, StopReason::HostRequested),
            (R::Superceded, StopReason::Superseded),
            (R::UserLogout, StopReason::HostRequested),
            (R::UserSwitch, StopReason::HostRequested),
            (R::ConnectionFailed, StopReason::Other),
            (R::Sleep, StopReason::Other),
            (R::AppUpdate, StopReason::HostRequested),
            (R::InternalError, StopReason::Other),
        ];
        assert_eq!(expect.len(), NEProviderStopReason::ALL.len());
        for (ios, sdk) in expect {
            assert_eq!(StopReason::from(ios), sdk, "{ios}");
        }
    }
}
