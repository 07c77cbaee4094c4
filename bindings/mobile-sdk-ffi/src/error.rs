//! The one error enum Swift sees: few cases, each something the host can act on.

use mobile_sdk::{ConfigError, StartError, core::InvalidReport};

/// Why a call failed.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum SdkError {
    /// The provider configuration cannot work (fix the configuration; retrying will not help).
    #[error("invalid configuration: {detail}")]
    InvalidConfig {
        /// What is wrong.
        detail: String,
    },
    /// A newer client for the same device has started; this one stays stopped.
    #[error("superseded: {detail}")]
    Superseded {
        /// Which device.
        detail: String,
    },
    /// The SDK is shutting down.
    #[error("the SDK is shutting down")]
    ShuttingDown,
    /// A call-outcome report the server would refuse (empty or overlong call id); it is not
    /// kept. Retrying the same report will not help.
    #[error("invalid call-outcome report: {detail}")]
    InvalidReport {
        /// What is wrong.
        detail: String,
    },
}

impl From<InvalidReport> for SdkError {
    fn from(e: InvalidReport) -> Self {
        SdkError::InvalidReport {
            detail: e.to_string(),
        }
    }
}

impl From<ConfigError> for SdkError {
    fn from(e: ConfigError) -> Self {
        SdkError::InvalidConfig {
            detail: e.to_string(),
        }
    }
}

impl From<StartError> for SdkError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Superseded(device) => SdkError::Superseded { detail: device },
            // Non-exhaustive upstream: anything new means the SDK cannot run.
            _ => SdkError::ShuttingDown,
        }
    }
}
