//! A log that goes to a file or the journal is plain text: no terminal colour codes, which
//! journald and log files would keep as escape sequences.

use e2e::ServerProcess;

/// Regression: the server coloured its log whatever it was written to, so a site's journal
/// showed `\x1b[32m INFO\x1b[0m` (the test harness hid it by setting `NO_COLOR`).
#[test]
fn the_servers_log_to_a_file_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    // An empty NO_COLOR is no request for plain text: only the file decides here.
    let mut server = ServerProcess::start_with_env(&dir.path().join("data"), &[], &[("NO_COLOR", "")]);
    server.kill();
    let log = server.log();
    assert!(
        log.contains(" INFO "),
        "the server logged nothing at info level:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "colour codes in the log:\n{log:?}");
}
