//! The app group's pending call-outcomes file (`nepush_provider::outcomes`), as pure functions
//! over its bytes: the app and the extension each read the file, call one of these, and write
//! the result back, inside one `NSFileCoordinator` write (both processes change it).

use nepush_provider::outcomes::PendingCallOutcomes;

use crate::{
    SdkError,
    types::{CallOutcome, CallOutcomeReport},
};

/// The reports in the file, oldest first (empty bytes: no file yet). What is not a report is
/// skipped.
#[uniffi::export]
pub fn read_pending_call_outcomes(file: Vec<u8>) -> Vec<CallOutcomeReport> {
    PendingCallOutcomes::parse(&file)
        .reports()
        .cloned()
        .map(Into::into)
        .collect()
}

/// The file with `report` appended (the app, when the user acted); unchanged content if the
/// same call id and outcome is pending. At most 64 reports: the oldest goes.
#[uniffi::export]
pub fn add_pending_call_outcome(file: Vec<u8>, report: CallOutcomeReport) -> Result<Vec<u8>, SdkError> {
    let mut pending = PendingCallOutcomes::parse(&file);
    pending.add(report.into())?;
    Ok(pending.to_bytes())
}

/// The file without the report of `outcome` for `call_id` (the extension, when the server
/// replied).
#[uniffi::export]
pub fn remove_pending_call_outcome(file: Vec<u8>, call_id: String, outcome: CallOutcome) -> Vec<u8> {
    let mut pending = PendingCallOutcomes::parse(&file);
    pending.remove(&call_id, outcome.into());
    pending.to_bytes()
}
