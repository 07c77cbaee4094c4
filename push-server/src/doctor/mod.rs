//! `push-server doctor`: a site's pre-flight. [`gather`] collects facts (the configuration, the
//! data directory, the server certificate, DNS and TCP reachability, the clocks phones report
//! through the running server's API); [`checks`] turns facts into findings with pure functions,
//! so tests feed facts and assert findings. One line per finding; any failure makes the command
//! exit non-zero.

pub mod checks;
pub mod gather;

use std::fmt;

use crate::config::ConfigArgs;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Checked and fine.
    Ok,
    /// Something the operator must check by hand (on the access points), not a test result.
    Note,
    /// Works, but is likely to bite.
    Warn,
    /// Breaks the site: the command exits non-zero.
    Fail,
}

/// One line of the report: how bad, which check, what was found and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// The check's short name (`certificate`, `ssids`, `dns`, ...).
    pub check: &'static str,
    /// What was found, and what to do about it.
    pub message: String,
}

impl Finding {
    fn new(severity: Severity, check: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity,
            check,
            message: message.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Ok => "ok",
            Severity::Note => "NOTE",
            Severity::Warn => "WARN",
            Severity::Fail => "FAIL",
        };
        write!(f, "{tag:<4} {}: {}", self.check, self.message)
    }
}

/// A check failed (its finding is printed already).
#[derive(Debug, thiserror::Error)]
#[error("{0} doctor checks failed")]
pub struct Failed(pub usize);

/// Run every check and print one line per finding; `Err` when any failed.
pub async fn run(args: ConfigArgs) -> Result<(), Failed> {
    let findings = match gather::gather(&args).await {
        Ok(facts) => checks::all(&facts),
        Err(finding) => vec![finding],
    };
    for f in &findings {
        println!("{f}");
    }
    let failed = findings.iter().filter(|f| f.severity == Severity::Fail).count();
    let warned = findings.iter().filter(|f| f.severity == Severity::Warn).count();
    println!("doctor: {failed} failed, {warned} warnings");
    if failed == 0 { Ok(()) } else { Err(Failed(failed)) }
}
