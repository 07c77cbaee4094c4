//! CA rotation: the standby CA key becomes the CA, a new server certificate is issued by it and
//! a new standby key is made. Phones enrolled before pin both keys, so they keep connecting;
//! phones enrolled two rotations back pin neither and must be enrolled again.
//!
//! The rotation replaces six files (CA certificate and key, standby key, server certificate
//! and key, generation), which no single rename covers. Each new file is first written beside
//! its old one (`<name>.rotating`), then a commit marker; only then are they renamed into place.
//! [`recover`], run before every load, finishes a rotation that has its marker and undoes one
//! that has not, so a crash at any point leaves the old PKI or the new one, never a mixture.

use std::{fmt, fs, path::Path, sync::Arc};

use parking_lot::{Mutex, RwLock};
use rcgen::KeyPair;
use rustls::{
    server::{ClientHello, ProducesTickets, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::{
    CA_CERT_FILE, CA_GENERATION_FILE, CA_KEY_FILE, CA_NEXT_KEY_FILE, Ca, Paths, Pki, PkiError,
    SERVER_CERT_FILE, SERVER_KEY_FILE, certified_key, exists, load_or_create, read_to_string, sync_dir,
    unix_now, wanted_names, write_file,
};

/// Suffix of a file staged by a rotation.
const STAGED: &str = ".rotating";
/// Written once every staged file is durable: from then on the rotation is finished, not undone.
const COMMIT_MARKER: &str = "rotation.commit";
/// The files a rotation replaces.
const ROTATED: [&str; 6] = [
    CA_CERT_FILE,
    CA_KEY_FILE,
    CA_NEXT_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    CA_GENERATION_FILE,
];

/// Rotate the CA of the PKI in `dir` (see the module docs) and return the new PKI.
pub fn rotate_ca(dir: &Path, server_names: &[String]) -> Result<Pki, PkiError> {
    let (current, _) = load_or_create(dir, server_names)?;
    let paths = Paths::new(dir);
    let standby_pem = read_to_string(&paths.ca_next_key)?;
    let standby = KeyPair::from_pem(&standby_pem).map_err(|e| PkiError::InvalidKey {
        path: paths.ca_next_key.clone(),
        reason: e.to_string(),
    })?;
    let now = unix_now();
    let ca = Ca::self_signed(&paths, &standby, now)?;
    let (server_cert, server_key) = ca.issue_server_cert(&wanted_names(server_names)?, now)?;
    let next =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Generate {
            what: "standby CA key",
            source,
        })?;
    let generation = (current.ca_generation + 1).to_string();
    let staged: [(&str, &str, u32); 6] = [
        (CA_CERT_FILE, &ca.cert_pem, 0o644),
        (CA_KEY_FILE, &standby_pem, 0o600),
        (CA_NEXT_KEY_FILE, &next.serialize_pem(), 0o600),
        (SERVER_CERT_FILE, &server_cert, 0o644),
        (SERVER_KEY_FILE, &server_key, 0o600),
        (CA_GENERATION_FILE, &generation, 0o644),
    ];
    for (name, contents, mode) in staged {
        write_file(&dir.join(format!("{name}{STAGED}")), contents.as_bytes(), mode)?;
    }
    sync_dir(dir);
    write_file(&dir.join(COMMIT_MARKER), generation.as_bytes(), 0o600)?;
    sync_dir(dir);
    recover(dir)?;
    let (pki, _) = load_or_create(dir, server_names)?;
    tracing::info!(
        generation = pki.ca_generation,
        ca_pin = %pki.ca_pin,
        next_ca_pin = %pki.next_ca_pin,
        previous_ca_pin = %current.ca_pin,
        "CA rotated: the standby key is the CA; phones enrolled before the previous rotation must be enrolled again"
    );
    Ok(pki)
}

/// Finish a rotation whose commit marker is written, or remove the files of one that is not.
/// `Some(true)`: finished one, `Some(false)`: undid one, `None`: there was none.
pub(super) fn recover(dir: &Path) -> Result<Option<bool>, PkiError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    let marker = dir.join(COMMIT_MARKER);
    let committed = exists(&marker)?;
    let mut found = false;
    for name in ROTATED {
        let staged = dir.join(format!("{name}{STAGED}"));
        if !exists(&staged)? {
            continue;
        }
        found = true;
        if committed {
            fs::rename(&staged, dir.join(name)).map_err(io(&staged))?;
        } else {
            fs::remove_file(&staged).map_err(io(&staged))?;
        }
    }
    if committed {
        sync_dir(dir);
        fs::remove_file(&marker).map_err(io(&marker))?;
    }
    sync_dir(dir);
    Ok(found.then_some(committed))
}

/// The CA generation recorded in `dir` (0 when none is).
pub(super) fn generation(dir: &Path) -> Result<u32, PkiError> {
    let path = dir.join(CA_GENERATION_FILE);
    if !exists(&path)? {
        return Ok(0);
    }
    read_to_string(&path)?
        .trim()
        .parse()
        .map_err(|e| PkiError::InvalidInput {
            what: "CA generation",
            reason: format!("{}: {e}", path.display()),
        })
}

/// The chain and key the listeners present, and the key of their session tickets, both
/// replaced by a rotation while the listeners run: every handshake reads the current ones, so a
/// rotation reaches new connections at once and established sessions are left alone. The
/// ticket key goes too, so no phone resumes past the rotation without verifying the new chain:
/// one that cannot is refused (and told why) at its next connection, not hours later.
pub struct CertSlot {
    chain: RwLock<Arc<CertifiedKey>>,
    tickets: RwLock<Arc<dyn ProducesTickets>>,
}

impl CertSlot {
    /// A slot presenting `pki`'s server certificate and CA.
    pub fn new(pki: &Pki) -> Result<Arc<Self>, PkiError> {
        Ok(Arc::new(Self {
            chain: RwLock::new(Arc::new(certified_key(pki)?)),
            tickets: RwLock::new(ticketer()?),
        }))
    }

    /// Present `pki`'s chain, and issue and accept tickets under a new key, from the next
    /// handshake on.
    pub fn replace(&self, pki: &Pki) -> Result<(), PkiError> {
        let (chain, tickets) = (Arc::new(certified_key(pki)?), ticketer()?);
        *self.chain.write() = chain;
        *self.tickets.write() = tickets;
        Ok(())
    }
}

fn ticketer() -> Result<Arc<dyn ProducesTickets>, PkiError> {
    rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|source| PkiError::Tls {
        what: "server",
        source,
    })
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("CertSlot").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.chain.read().clone())
    }
}

impl ProducesTickets for CertSlot {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.tickets.read().lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.tickets.read().encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.tickets.read().decrypt(cipher)
    }
}

/// A running server's rotations: one at a time, on its own PKI directory, then the listeners'
/// certificates.
pub struct Rotator {
    dir: std::path::PathBuf,
    server_names: Vec<String>,
    certs: Arc<CertSlot>,
    busy: Mutex<()>,
}

impl Rotator {
    /// Rotations of the PKI in `dir` (certificates for `server_names`), presented through `certs`.
    pub fn new(dir: &Path, server_names: &[String], certs: Arc<CertSlot>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            server_names: server_names.to_vec(),
            certs,
            busy: Mutex::new(()),
        }
    }

    /// Rotate the CA and present the new chain from the next handshake on (blocking I/O).
    pub fn rotate(&self) -> Result<Pki, PkiError> {
        let _one = self.busy.lock();
        let pki = rotate_ca(&self.dir, &self.server_names)?;
        self.certs.replace(&pki)?;
        Ok(pki)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{PkiStatus, client_config, server_config, spki_pin};

    fn staged(dir: &Path, name: &str) -> std::path::PathBuf {
        dir.join(format!("{name}{STAGED}"))
    }

    #[test]
    fn a_rotation_promotes_the_standby_key_and_makes_a_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (before, _) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!(before.ca_generation, 0);
        let after = rotate_ca(tmp.path(), &[]).unwrap();
        assert_eq!(after.ca_generation, 1);
        assert_eq!(after.ca_pin, before.next_ca_pin, "the standby key is the CA now");
        assert_ne!(after.next_ca_pin, before.next_ca_pin);
        assert_ne!(after.next_ca_pin, before.ca_pin);
        assert_ne!(after.server_pin, before.server_pin);
        // The chain verifies under the new CA, and the new files load as they are.
        let (loaded, status) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!(status, PkiStatus::Loaded);
        assert_eq!(loaded.ca_pin, after.ca_pin);
        assert_eq!(loaded.ca_generation, 1);
        let presented = crate::pki::pem_certs(&after.ca_cert_pem).unwrap();
        assert_eq!(spki_pin(presented[0].as_ref()).unwrap(), before.next_ca_pin);
        let left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !left
                .iter()
                .any(|n| n.to_string_lossy().ends_with(STAGED) || n == COMMIT_MARKER),
            "{left:?}"
        );
        assert_eq!(rotate_ca(tmp.path(), &[]).unwrap().ca_generation, 2);
        // Both configs are usable (handshakes are covered by the e2e test with SDK phones).
        server_config(&loaded).unwrap();
        client_config(&loaded.ca_cert_pem).unwrap();
    }

    #[test]
    fn an_uncommitted_rotation_is_undone_and_a_committed_one_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, _) = load_or_create(tmp.path(), &[]).unwrap();
        // What a finished rotation writes, from a copy of the same PKI.
        let other = tempfile::tempdir().unwrap();
        for name in [
            CA_CERT_FILE,
            CA_KEY_FILE,
            CA_NEXT_KEY_FILE,
            SERVER_CERT_FILE,
            SERVER_KEY_FILE,
        ] {
            fs::copy(tmp.path().join(name), other.path().join(name)).unwrap();
        }
        let new = rotate_ca(other.path(), &[]).unwrap();

        // Crash before the marker: some staged files, no marker. The old PKI stays.
        fs::copy(other.path().join(CA_CERT_FILE), staged(tmp.path(), CA_CERT_FILE)).unwrap();
        fs::copy(other.path().join(CA_KEY_FILE), staged(tmp.path(), CA_KEY_FILE)).unwrap();
        let (kept, _) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!((kept.ca_pin, kept.ca_generation), (old.ca_pin.clone(), 0));
        assert!(!staged(tmp.path(), CA_CERT_FILE).exists());

        // Crash after the marker, some files already renamed: the rotation is finished.
        for name in ROTATED {
            fs::copy(other.path().join(name), staged(tmp.path(), name)).unwrap();
        }
        fs::rename(staged(tmp.path(), CA_CERT_FILE), tmp.path().join(CA_CERT_FILE)).unwrap();
        fs::write(tmp.path().join(COMMIT_MARKER), "1").unwrap();
        let (done, _) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!(done.ca_pin, new.ca_pin);
        assert_eq!(done.next_ca_pin, new.next_ca_pin);
        assert_eq!(done.ca_generation, 1);
        assert!(!tmp.path().join(COMMIT_MARKER).exists());
    }

    #[test]
    fn a_replaced_slot_presents_the_new_chain_and_forgets_old_tickets() {
        let tmp = tempfile::tempdir().unwrap();
        let (before, _) = load_or_create(tmp.path(), &[]).unwrap();
        let slot = CertSlot::new(&before).unwrap();
        let ticket = slot.encrypt(b"session state").unwrap();
        assert_eq!(slot.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        let chain = |slot: &CertSlot| spki_pin(slot.chain.read().cert[1].as_ref()).unwrap();
        assert_eq!(chain(&slot), before.ca_pin);

        let after = rotate_ca(tmp.path(), &[]).unwrap();
        slot.replace(&after).unwrap();
        assert_eq!(chain(&slot), after.ca_pin);
        assert_eq!(
            slot.decrypt(&ticket),
            None,
            "a ticket from before the rotation resumes nothing"
        );
    }
}
