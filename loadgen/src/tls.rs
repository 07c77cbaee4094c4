//! TLS for the load generator's own connections: a client configuration trusting one CA, and
//! the CA plus server certificate Mosquitto is given (made like the push-server's own: ECDSA
//! P-256, the CA sent after the leaf).

use std::{path::Path, sync::Arc};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

/// TLS 1.3 client configuration (aws-lc-rs, like the SDK) trusting the CA certificates in `ca_pem`.
pub fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("CA PEM")?)?;
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Files of a broker's TLS identity.
pub struct BrokerCerts {
    pub ca_pem: String,
    pub chain_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
}

/// A private CA and a server certificate for `localhost` and 127.0.0.1, written into `dir`.
pub fn broker_certs(dir: &Path) -> anyhow::Result<BrokerCerts> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "push-loadgen broker CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    leaf.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress("127.0.0.1".parse()?),
    ];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf.signed_by(&key, &issuer)?;

    let chain_file = dir.join("broker-chain.pem");
    let key_file = dir.join("broker-key.pem");
    std::fs::write(&chain_file, format!("{}{}", cert.pem(), ca_cert.pem()))?;
    std::fs::write(&key_file, key.serialize_pem())?;
    Ok(BrokerCerts {
        ca_pem: ca_cert.pem(),
        chain_file,
        key_file,
    })
}
