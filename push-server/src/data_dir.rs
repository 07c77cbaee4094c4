//! The data directory: what lives where (the backup, the doctor and the server agree on it here),
//! and its creation owner-only.

use std::path::Path;

use anyhow::Context;

/// File holding the bootstrap admin API key (mode 0600).
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// Directory of the CA and server certificate inside the data directory.
pub const TLS_DIR: &str = "tls";
/// The store inside the data directory (message content, PushKit tokens: owner-only).
pub const STORE_FILE: &str = "push.redb";

/// Create the data directory owner-only (0700) and an empty store file (0600) when missing: they
/// hold every key and the messages' content, which the process umask (usually 022) would leave
/// readable by every local user. An existing directory keeps its mode, with a warning if it is
/// open to group or others.
pub fn prepare(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read data directory {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "the data directory is open to group/others; it holds the keys and message content: chmod 700 it"
        );
    }
    // redb initialises an empty file as a new database; creating it here decides its mode.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(STORE_FILE))
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", dir.join(STORE_FILE).display())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::store::{RedbStore, Store};

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_data_dir_and_store_are_owner_only_and_the_store_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/lpush");
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(STORE_FILE)), 0o600);
        // The empty file becomes a working store, and a second start keeps it.
        let store = RedbStore::open(&dir.join(STORE_FILE)).unwrap();
        assert!(store.load().unwrap().devices.is_empty());
        drop(store);
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir.join(STORE_FILE)), 0o600);
        RedbStore::open(&dir.join(STORE_FILE)).unwrap();
    }
}
