//! Backups of an embedded (single-node) server: one file holding a consistent snapshot of the
//! store, taken by the running server inside one read transaction, and the key material of its
//! data directory; and the restore that checks such a file and installs it.
//!
//! The file: [`MAGIC`], the format version (u32, big-endian), the manifest's length (u32) and
//! the manifest (JSON: when, which server, each file's path, mode and length), the files'
//! bytes in manifest order, then the SHA-256 of everything before it. It holds the CA and
//! credential keys, so it is written owner-only (0600) and must be kept like them.
//!
//! A restored store has lost what happened after its snapshot, so the restore gives it a new
//! epoch: phones' floors from the old epoch acknowledge nothing, and what they may not have
//! seen is numbered above them (`device.proto`, "Epochs and the floor"). No sequence number a
//! phone has seen is reused and no push is reported ACKED that the device did not acknowledge.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufReader, BufWriter, Read, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{
    auth,
    data_dir::{ADMIN_KEY_FILE, STORE_FILE, TLS_DIR},
    pki,
    store::{RedbStore, Store, StoreError},
};

/// The first bytes of a backup file.
pub const MAGIC: &[u8; 8] = b"LPUSHBAK";
/// The format this server writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest manifest accepted (a real one is well under a kilobyte).
const MAX_MANIFEST: u32 = 64 * 1024;

/// What a backup holds besides the store, relative to the data directory, and whether a
/// server's data directory always has it (the server certificate is reissued when missing).
fn key_files() -> [(String, bool); 8] {
    let tls = |name: &str| format!("{TLS_DIR}/{name}");
    [
        (auth::KEY_FILE.to_string(), true),
        (ADMIN_KEY_FILE.to_string(), false),
        (tls(pki::CA_CERT_FILE), true),
        (tls(pki::CA_KEY_FILE), true),
        (tls(pki::CA_NEXT_KEY_FILE), false),
        (tls(pki::SERVER_CERT_FILE), false),
        (tls(pki::SERVER_KEY_FILE), false),
        (tls(pki::CA_GENERATION_FILE), false),
    ]
}

/// Why a backup or restore failed. Nothing of the data directory changed when a restore fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The store could not be copied or the restored copy is unusable.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The file is not a backup, is damaged or is incomplete.
    #[error("{}: not a usable backup: {reason}", path.display())]
    Invalid {
        /// The backup file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A server is running on the data directory.
    #[error(
        "{} is open in a running push-server; stop it before restoring",
        path.display()
    )]
    InUse {
        /// The store file that is locked.
        path: PathBuf,
    },
    /// The key material in the backup is unusable.
    #[error("the backup's certificates or keys: {0}")]
    Pki(#[from] pki::PkiError),
}

/// The manifest at the head of a backup file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// When the snapshot was taken, Unix ms.
    pub created_at_ms: i64,
    /// Version of the server that took it.
    pub server_version: String,
    /// The files, in the order their bytes follow.
    pub files: Vec<Entry>,
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the data directory.
    pub path: String,
    /// Unix permission bits it had.
    pub mode: u32,
    /// Its length in bytes.
    pub len: u64,
}

/// What [`restore`] did.
#[derive(Debug)]
pub struct Restored {
    /// The backup's manifest.
    pub manifest: Manifest,
    /// The restored store's new epoch.
    pub epoch: u64,
    /// Where the data directory that was replaced now is, if there was one.
    pub previous: Option<PathBuf>,
}

/// Write a backup of the server on `data_dir`, whose open store is `store`, to a new file
/// `out` (mode 0600; an existing file is not overwritten). The store's snapshot is one read
/// transaction, taken while the server runs.
pub fn create(data_dir: &Path, store: &dyn Store, out: &Path) -> Result<Manifest, BackupError> {
    let snapshot = data_dir.join(format!(".backup-{:016x}.redb", rand::random::<u64>()));
    // Created owner-only first: redb initialises an empty file and keeps its mode.
    create_private(&snapshot)?;
    let result = store
        .snapshot_to(&snapshot)
        .map_err(BackupError::from)
        .and_then(|()| write_archive(data_dir, &snapshot, out));
    let _ = fs::remove_file(&snapshot);
    result
}

/// [`create`] into a file in `data_dir` that is unlinked once open: the open file, to stream
/// to a client, is all that is left of it.
pub fn open_snapshot(data_dir: &Path, store: &dyn Store) -> Result<(Manifest, File), BackupError> {
    let path = data_dir.join(format!(".backup-{:016x}.lpbak", rand::random::<u64>()));
    let result =
        create(data_dir, store, &path).and_then(|m| Ok((m, File::open(&path).map_err(io_at(&path))?)));
    let _ = fs::remove_file(&path);
    result
}

fn write_archive(data_dir: &Path, snapshot: &Path, out: &Path) -> Result<Manifest, BackupError> {
    let mut sources = vec![(STORE_FILE.to_string(), snapshot.to_path_buf())];
    for (name, required) in key_files() {
        let path = data_dir.join(&name);
        if required || path.exists() {
            sources.push((name, path));
        }
    }
    let mut files = Vec::with_capacity(sources.len());
    for (name, path) in &sources {
        let meta = fs::metadata(path).map_err(io_at(path))?;
        files.push(Entry {
            path: name.clone(),
            mode: meta.permissions().mode() & 0o777,
            len: meta.len(),
        });
    }
    let manifest = Manifest {
        created_at_ms: crate::hub::now_ms(),
        server_version: env!("CARGO_PKG_VERSION").into(),
        files,
    };
    let json = serde_json::to_vec(&manifest).expect("a manifest always serialises");

    let file = create_private(out)?;
    let mut w = Hashing::new(BufWriter::new(file));
    let header = [
        &MAGIC[..],
        &FORMAT_VERSION.to_be_bytes(),
        &u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes(),
        &json,
    ];
    let write = |w: &mut Hashing<BufWriter<File>>, bytes: &[u8]| w.write_all(bytes).map_err(io_at(out));
    for part in header {
        write(&mut w, part)?;
    }
    for ((_, path), entry) in sources.iter().zip(&manifest.files) {
        // Exactly the length the manifest says, even if a file changed since.
        let copied = io::copy(
            &mut File::open(path).map_err(io_at(path))?.take(entry.len),
            &mut w,
        )
        .map_err(io_at(path))?;
        if copied != entry.len {
            return Err(BackupError::Io {
                path: path.clone(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while being copied"),
            });
        }
    }
    let (mut inner, digest) = w.finish();
    inner.write_all(&digest).map_err(io_at(out))?;
    let file = inner.into_inner().map_err(|e| io_at(out)(e.into_error()))?;
    file.sync_all().map_err(io_at(out))?;
    Ok(manifest)
}

/// Check the backup `archive` and install it as `data_dir`. Refuses while a server has the
/// data directory's store open. The files are unpacked and checked (format, version, the
/// checksum of the whole file, the store's rows, the CA and its key) next to the data
/// directory; only then is the old directory moved aside (to `<dir>.before-restore-<ms>`) and
/// the new one renamed into place. The restored store gets a new epoch.
pub fn restore(archive: &Path, data_dir: &Path) -> Result<Restored, BackupError> {
    let store = data_dir.join(STORE_FILE);
    if store.exists() && RedbStore::in_use(&store) {
        return Err(BackupError::InUse { path: store });
    }
    let name = data_dir
        .file_name()
        .ok_or_else(|| BackupError::Io {
            path: data_dir.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory name"),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = parent.join(format!(".{name}.restoring-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io_at(&staging))?;
    }
    let result = unpack(archive, &staging).and_then(|manifest| {
        let epoch = RedbStore::renew_epoch(&staging.join(STORE_FILE))?;
        // The CA must load with its key; a missing server certificate is reissued here.
        pki::load_or_create(&staging.join(TLS_DIR), &[])?;
        sync_dir(&staging.join(TLS_DIR))?;
        sync_dir(&staging)?;
        Ok((manifest, epoch))
    });
    let (manifest, epoch) = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    let previous = if fs::exists(data_dir).map_err(io_at(data_dir))? {
        let aside = parent.join(format!("{name}.before-restore-{}", crate::hub::now_ms()));
        fs::rename(data_dir, &aside).map_err(io_at(data_dir))?;
        Some(aside)
    } else {
        None
    };
    fs::rename(&staging, data_dir).map_err(io_at(data_dir))?;
    sync_dir(&parent)?;
    Ok(Restored {
        manifest,
        epoch,
        previous,
    })
}

/// Read and check `archive` into the new directory `dir`: everything is written before the
/// checksum is compared, and the caller removes `dir` on any error.
fn unpack(archive: &Path, dir: &Path) -> Result<Manifest, BackupError> {
    let invalid = |reason: String| BackupError::Invalid {
        path: archive.to_path_buf(),
        reason,
    };
    let truncated = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => invalid("the file is truncated".into()),
        _ => BackupError::Io {
            path: archive.to_path_buf(),
            source: e,
        },
    };
    let mut r = Hashing::new(BufReader::new(File::open(archive).map_err(io_at(archive))?));
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(truncated)?;
    if &magic != MAGIC {
        return Err(invalid("it does not start like a push-server backup".into()));
    }
    let mut word = [0u8; 4];
    r.read_exact(&mut word).map_err(truncated)?;
    let version = u32::from_be_bytes(word);
    if version != FORMAT_VERSION {
        return Err(invalid(format!(
            "format version {version}; this server reads version {FORMAT_VERSION}"
        )));
    }
    r.read_exact(&mut word).map_err(truncated)?;
    let len = u32::from_be_bytes(word);
    if len > MAX_MANIFEST {
        return Err(invalid(format!("a manifest of {len} bytes")));
    }
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json).map_err(truncated)?;
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| invalid(format!("bad manifest: {e}")))?;
    check_entries(&manifest.files).map_err(invalid)?;

    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_at(dir))?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir.join(TLS_DIR))
        .map_err(io_at(dir))?;
    for entry in &manifest.files {
        let path = dir.join(&entry.path);
        // Never wider than the server makes them: certificates 0644, everything else 0600.
        let mode = entry.mode & 0o644 | 0o600;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io_at(&path))?;
        let copied = io::copy(&mut (&mut r).take(entry.len), &mut file).map_err(io_at(&path))?;
        if copied != entry.len {
            return Err(invalid("the file is truncated".into()));
        }
        file.sync_all().map_err(io_at(&path))?;
    }
    let (mut rest, digest) = r.finish();
    let mut stored = Vec::new();
    rest.read_to_end(&mut stored).map_err(io_at(archive))?;
    if stored.len() != digest.len() {
        return Err(invalid(format!(
            "{} bytes after the files where a 32-byte checksum belongs",
            stored.len()
        )));
    }
    if stored != digest.as_slice() {
        return Err(invalid("the checksum does not match: the file is damaged".into()));
    }
    Ok(manifest)
}

/// Every entry is a file a backup holds, once; the store and the required keys are present.
fn check_entries(files: &[Entry]) -> Result<(), String> {
    let known = key_files();
    let mut seen = std::collections::HashSet::new();
    for entry in files {
        let allowed = entry.path == STORE_FILE || known.iter().any(|(name, _)| *name == entry.path);
        if !allowed {
            return Err(format!("unexpected file {:?}", entry.path));
        }
        if !seen.insert(entry.path.as_str()) {
            return Err(format!("{:?} appears twice", entry.path));
        }
    }
    let required =
        std::iter::once(STORE_FILE.to_string()).chain(known.into_iter().filter(|(_, r)| *r).map(|(n, _)| n));
    for name in required {
        if !seen.contains(name.as_str()) {
            return Err(format!("{name:?} is missing"));
        }
    }
    Ok(())
}

/// A reader or writer that hashes every byte passing through it.
struct Hashing<T> {
    inner: T,
    hash: Sha256,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
        }
    }

    fn finish(self) -> (T, [u8; 32]) {
        (self.inner, self.hash.finalize().into())
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A new file, owner-only; an existing one is an error (never overwrite a key or a backup).
fn create_private(path: &Path) -> Result<File, BackupError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_at(path))
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{Op, commit};

    /// A data directory as a server leaves it: CA and server certificate, credential key,
    /// admin key, and an open store with one device's ceiling in it.
    fn site(dir: &Path) -> Arc<RedbStore> {
        fs::DirBuilder::new().mode(0o700).create(dir).unwrap();
        pki::load_or_create(&dir.join(TLS_DIR), &[]).unwrap();
        auth::DeviceAuthority::load_or_create(dir).unwrap();
        auth::write_secret(&dir.join(ADMIN_KEY_FILE), "admin-key").unwrap();
        let store = Arc::new(RedbStore::open(&dir.join(STORE_FILE)).unwrap());
        let ops = vec![Op::PutSeqCeiling {
            device_id: "phone-1".into(),
            ceiling: 2049,
        }];
        futures::executor::block_on(commit(&*store, ops)).unwrap();
        store
    }

    /// The key files a server's data directory has.
    const KEYS: [&str; 5] = [
        "device-jwt.key",
        "admin.key",
        "tls/ca.pem",
        "tls/ca.key",
        "tls/ca-next.key",
    ];

    fn read(path: &Path) -> Vec<u8> {
        fs::read(path).unwrap()
    }

    /// A site in `tmp/live` and its backup `tmp/site.lpbak`.
    fn backed_up(tmp: &Path) -> (PathBuf, Arc<RedbStore>, PathBuf) {
        let live = tmp.join("live");
        let store = site(&live);
        let file = tmp.join("site.lpbak");
        create(&live, &*store, &file).unwrap();
        (live, store, file)
    }

    #[test]
    fn a_backup_restores_the_keys_and_the_store_under_a_new_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        let store = site(&live);
        let epoch = store.load().unwrap().epoch;
        let file = tmp.path().join("site.lpbak");
        let manifest = create(&live, &*store, &file).unwrap();
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names[0], STORE_FILE);
        for name in KEYS {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        assert!(
            create(&live, &*store, &file).is_err(),
            "never over an existing file"
        );

        // Into a directory that does not exist yet, then over an existing (stopped) one.
        let target = tmp.path().join("restored");
        let first = restore(&file, &target).unwrap();
        assert!(first.previous.is_none());
        assert_ne!(first.epoch, epoch);
        for name in KEYS {
            assert_eq!(read(&target.join(name)), read(&live.join(name)), "{name}");
        }
        assert_eq!(
            fs::metadata(target.join("tls/ca.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let restored = RedbStore::open(&target.join(STORE_FILE)).unwrap().load().unwrap();
        assert_eq!(restored.epoch, first.epoch);
        assert_eq!(restored.seq_ceilings, vec![("phone-1".into(), 2049)]);

        let second = restore(&file, &target).unwrap();
        assert_ne!(second.epoch, first.epoch, "every restore is a new epoch");
        let previous = second.previous.expect("the replaced directory is kept");
        assert_eq!(read(&previous.join("tls/ca.key")), read(&live.join("tls/ca.key")));
    }

    #[test]
    fn a_damaged_or_foreign_file_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, _store, file) = backed_up(tmp.path());
        let good = read(&file);
        let target = tmp.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("marker"), "old").unwrap();

        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 1;
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("flipped", flipped, "checksum"),
            ("truncated", good[..good.len() - 40].to_vec(), "truncated"),
            ("extended", [&good[..], b"x"].concat(), "checksum belongs"),
            (
                "foreign",
                b"PK\x03\x04 a zip file".to_vec(),
                "does not start like",
            ),
            (
                "newer",
                [&MAGIC[..], &2u32.to_be_bytes(), &good[12..]].concat(),
                "format version 2",
            ),
        ];
        for (what, bytes, expected) in cases {
            let bad = tmp.path().join(format!("{what}.lpbak"));
            fs::write(&bad, bytes).unwrap();
            let err = restore(&bad, &target).unwrap_err();
            assert!(err.to_string().contains(expected), "{what}: {err}");
            assert_eq!(
                fs::read_to_string(target.join("marker")).unwrap(),
                "old",
                "{what}"
            );
            let left: Vec<_> = fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(
                !left.iter().any(|n| n.to_string_lossy().contains("restoring")),
                "{what}: staging left behind: {left:?}"
            );
        }
    }

    #[test]
    fn a_running_servers_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (live, store, file) = backed_up(tmp.path());
        let err = restore(&file, &live).unwrap_err();
        assert!(matches!(err, BackupError::InUse { .. }), "{err}");
        drop(store);
        assert!(restore(&file, &live).is_ok(), "once stopped");
    }

    #[test]
    fn a_manifest_naming_other_files_is_refused() {
        let entry = |path: &str| Entry {
            path: path.into(),
            mode: 0o600,
            len: 0,
        };
        let required = || {
            ["push.redb", "device-jwt.key", "tls/ca.pem", "tls/ca.key"]
                .map(entry)
                .to_vec()
        };
        assert_eq!(check_entries(&required()), Ok(()));
        for bad in ["../etc/passwd", "/etc/passwd", "tls/../../x", "server-1.log"] {
            let mut files = required();
            files.push(entry(bad));
            assert!(check_entries(&files).unwrap_err().contains("unexpected"), "{bad}");
        }
        let mut twice = required();
        twice.push(entry("tls/ca.key"));
        assert!(check_entries(&twice).unwrap_err().contains("twice"));
        assert!(check_entries(&required()[1..]).unwrap_err().contains("push.redb"));
    }
}
