//! TLS client configuration: TLS 1.3 only, ALPN `lpush/1`, trust from the provider
//! configuration (private CA and/or SPKI pins, see [`Trust`]).

use std::sync::Arc;

use base64::Engine as _;
use rustls::{
    CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
    client::{
        Resumption, WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    server::ParsedCertificate,
};
use sha2::{Digest as _, Sha256};

use crate::config::{ConfigError, Trust};

/// Build the rustls configuration for `trust`.
pub fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, ConfigError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = PinningVerifier::new(trust, provider.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConfigError::Trust(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![push_proto::ALPN.to_vec()];
    // Resumption makes reconnects cheap for the phone, but the default cache preallocates room
    // for 32 servers (about 13 KiB per client); a device talks to one, two while a name moves.
    config.resumption = Resumption::in_memory_sessions(RESUMPTION_TICKETS);
    Ok(config)
}

/// TLS 1.3 session tickets kept: rustls keeps up to 8 per server name, so this is two names.
const RESUMPTION_TICKETS: usize = 16;

/// The name to verify, from text (a DNS name or an IP address).
pub fn server_name(name: &str) -> Result<ServerName<'static>, ConfigError> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| ConfigError::Trust(format!("server name {name:?}: {e}")))
}

/// `sha256/<base64>` of a certificate's SubjectPublicKeyInfo.
pub fn spki_pin(cert: &CertificateDer<'_>) -> Result<String, Error> {
    Ok(format!(
        "sha256/{}",
        base64::engine::general_purpose::STANDARD.encode(spki_sha256(cert)?)
    ))
}

fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    Ok(Sha256::digest(parsed.subject_public_key_info().as_ref()).into())
}

/// Path validation to the configured CAs, with SPKI pinning on top when pins are set.
///
/// A pinned key is trusted as the server's own key, or as the CA it chains to; a pinned CA must
/// still sign the leaf through ordinary path validation, so presenting a copy of the pinned CA
/// next to some other leaf gains nothing.
#[derive(Debug)]
struct PinningVerifier {
    anchors: Vec<CertificateDer<'static>>,
    pins: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl PinningVerifier {
    fn new(trust: &Trust, provider: Arc<CryptoProvider>) -> Result<Self, ConfigError> {
        let bad = |m: String| ConfigError::Trust(m);
        let anchors = match &trust.ca_pem {
            Some(pem) => {
                let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(format!("CA PEM: {e}")))?;
                if certs.is_empty() {
                    return Err(bad("CA PEM holds no certificate".into()));
                }
                for cert in &certs {
                    // Fail now, not at the first handshake.
                    RootCertStore::empty()
                        .add(cert.clone())
                        .map_err(|e| bad(format!("CA certificate: {e}")))?;
                }
                certs
            }
            None => Vec::new(),
        };
        let pins = trust
            .pins
            .iter()
            .map(|pin| {
                parse_pin(pin).ok_or_else(|| bad(format!("pin {pin:?} is not sha256/<base64 of 32 bytes>")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if anchors.is_empty() && pins.is_empty() {
            return Err(bad("neither a CA certificate nor a pin".into()));
        }
        Ok(Self {
            anchors,
            pins,
            provider,
        })
    }

    fn pinned(&self, cert: &CertificateDer<'_>) -> bool {
        spki_sha256(cert).is_ok_and(|hash| self.pins.contains(&hash))
    }
}

/// The server presented no key the device pins. With a site's own server that means its CA
/// was rotated twice since the device was enrolled (an enrollment pins the CA of its day and
/// the standby one), so the device must be enrolled again.
#[derive(Debug)]
pub struct NotPinned;

impl std::fmt::Display for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the server presents no key this device pins: its CA was rotated past this \
             enrollment (or it is not the site's server); enroll the device again",
        )
    }
}

impl std::error::Error for NotPinned {}

/// A failed handshake's error, with [`NotPinned`]'s own words when that is the cause (rustls
/// shows a custom certificate error only by its type name).
pub(crate) fn explain(e: std::io::Error) -> std::io::Error {
    let not_pinned = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(|tls| match tls {
            Error::InvalidCertificate(CertificateError::Other(other)) => other.0.is::<NotPinned>(),
            _ => false,
        });
    if not_pinned {
        std::io::Error::new(std::io::ErrorKind::InvalidData, NotPinned.to_string())
    } else {
        e
    }
}

fn parse_pin(pin: &str) -> Option<[u8; 32]> {
    let b64 = pin.trim().strip_prefix("sha256/")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    bytes.try_into().ok()
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The server's own key is pinned: the TLS 1.3 handshake signature proves it holds it.
        if self.pinned(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        let mut roots = RootCertStore::empty();
        // Configured CAs are anchors (only the pinned ones, when pins are set). A certificate the
        // server presents is an anchor only if it is pinned: otherwise any server could vouch for
        // itself by sending its own CA. One that is not a usable CA just does not become one.
        let configured = self
            .anchors
            .iter()
            .filter(|c| self.pins.is_empty() || self.pinned(c));
        let presented = intermediates.iter().filter(|c| self.pinned(c));
        for cert in configured.chain(presented) {
            let _ = roots.add(cert.clone().into_owned());
        }
        if roots.is_empty() {
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| Error::General(e.to_string()))?;
        verifier
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| {
                // The server presented no key this device pins: say what fixes it.
                let pinned = intermediates.iter().any(|c| self.pinned(c));
                if self.pins.is_empty() || pinned {
                    e
                } else {
                    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                        NotPinned,
                    ))))
                }
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_must_be_sha256_of_32_bytes() {
        let good = format!(
            "sha256/{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32])
        );
        assert_eq!(parse_pin(&good), Some([7u8; 32]));
        assert_eq!(parse_pin("sha1/AAAA"), None);
        assert_eq!(parse_pin("sha256/not base64"), None);
        let short = format!(
            "sha256/{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 16])
        );
        assert_eq!(parse_pin(&short), None);
        assert!(client_config(&Trust::pins([good])).is_ok());
        assert!(matches!(
            client_config(&Trust::pins(["sha256/xyz"])),
            Err(ConfigError::Trust(_))
        ));
    }

    #[test]
    fn garbage_ca_pem_is_refused_up_front() {
        assert!(matches!(
            client_config(&Trust::ca("not a pem")),
            Err(ConfigError::Trust(_))
        ));
        let err = client_config(&Trust::ca(
            "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
        ));
        assert!(matches!(err, Err(ConfigError::Trust(_))), "{err:?}");
    }

    #[test]
    fn alpn_and_tls13_only() {
        let pin = format!(
            "sha256/{}",
            base64::engine::general_purpose::STANDARD.encode([1u8; 32])
        );
        let cfg = client_config(&Trust::pins([pin])).unwrap();
        assert_eq!(cfg.alpn_protocols, vec![push_proto::ALPN.to_vec()]);
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("bad name").is_err());
    }
}
