//! What the operating system says about this process: open file descriptors and resident
//! memory. Both are process-wide: run one scenario per process (or serialise them) when the
//! figures must mean something.

/// Open file descriptors of this process (`/proc/self/fd`), if readable.
pub fn open_fds() -> Option<usize> {
    // The directory handle itself is one of the entries while it is read.
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count().saturating_sub(1))
}

/// Resident set size of this process in KiB (`VmRSS` in `/proc/self/status`), if readable.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Threads of this process (`Threads` in `/proc/self/status`), if readable.
pub fn threads() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_on_linux() {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(open_fds().unwrap() >= 1);
        assert!(std::path::Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())).exists());
        drop(f);
        assert!(rss_kib().unwrap() > 0);
        assert!(threads().unwrap() >= 1);
    }
}
