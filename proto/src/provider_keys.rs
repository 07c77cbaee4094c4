//! The keys of a Local Push manager's `providerConfiguration` dictionary: the server writes them
//! when it enrolls a device, the provider reads them (one list, so the two cannot drift).

/// Server host name or IP address (string, required).
pub const HOST: &str = "host";
/// Server port (integer 1-65535, required).
pub const PORT: &str = "port";
/// Name the server certificate must carry (string, optional; default: `host`).
pub const SERVER_NAME: &str = "serverName";
/// Device id the credential was issued for (string, required).
pub const DEVICE_ID: &str = "deviceId";
/// Device credential, a JWT (string, required).
pub const CREDENTIAL: &str = "credential";
/// PEM of the CA certificate(s) to trust (string, optional).
pub const CA_CERTIFICATE: &str = "caCertificate";
/// SPKI pins, `sha256/<base64>` (array of strings, optional). At least one of
/// `caCertificate` and `pins` is required.
pub const PINS: &str = "pins";
/// The site's SSIDs (array of strings, optional): informational for the provider (iOS
/// matches networks from the manager's own `matchSSIDs`).
pub const MATCH_SSIDS: &str = "matchSSIDs";
