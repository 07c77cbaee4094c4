//! The architecture test both sans-IO cores (the server's session core, the SDK's) run on
//! their own sources.

use std::path::PathBuf;

/// Architecture invariant of a sans-IO core (the server's session core, the SDK's): its sources
/// outside `tests` name no I/O, thread or clock. Checks the files under `paths`; returns how many.
pub fn assert_sans_io(paths: &[PathBuf]) -> usize {
    let banned = "tokio rustls std::net std::io std::fs std::thread Instant::now SystemTime";
    let mut checked = 0;
    let mut stack = paths.to_vec();
    while let Some(path) = stack.pop() {
        if path.file_stem().is_some_and(|name| name == "tests") {
            // The tests may use anything; the core itself may not.
        } else if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for banned in banned.split(' ') {
                    assert!(!line.contains(banned), "{} uses {banned}", path.display());
                }
            }
            checked += 1;
        }
    }
    checked
}
