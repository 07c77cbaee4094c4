//! The Swift side (`nepush-provider/ios/`) cannot be compiled here, so this test checks the
//! next best thing: it generates the Swift binding from the built library (as
//! `build-xcframework.sh` does) and checks that every call the Swift files make into it names a
//! declaration that exists, with the same argument labels in the same order.

mod common;

use std::path::Path;

fn generate_swift(out: &Path) -> String {
    common::generate_binding(out, "swift");
    std::fs::read_to_string(out.join("mobile_sdk_ffi.swift")).unwrap()
}

/// Source without comments or whitespace, so declarations and calls compare as token runs.
fn squash(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r);
        } else if let Some(after) = rest.strip_prefix("//") {
            rest = after.split_once('\n').map_or("", |(_, r)| r);
        } else {
            let c = rest.chars().next().unwrap();
            if !c.is_whitespace() {
                out.push(c);
            }
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The argument labels of the first parenthesised list after `opening` (which ends in `(`).
fn labels(src: &str, opening: &str) -> Vec<String> {
    let start = src
        .find(opening)
        .unwrap_or_else(|| panic!("{opening:?} not found"))
        + opening.len();
    let (mut depth, mut labels, mut token) = (1, Vec::new(), String::new());
    for c in src[start..].chars() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' if depth == 1 => break,
            ')' | ']' => depth -= 1,
            ':' if depth == 1 && !token.is_empty() => labels.push(std::mem::take(&mut token)),
            c if c.is_alphanumeric() || c == '_' => {
                token.push(c);
                continue;
            }
            _ => {}
        }
        token.clear();
    }
    labels
}

#[test]
fn the_swift_files_call_the_binding_as_it_is_generated() {
    let out = tempfile::tempdir().unwrap();
    let binding = squash(&generate_swift(out.path()));
    let ios = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nepush-provider/ios");
    let swift: String = [
        "Extension/LocalPushProvider.swift",
        "App/VoipPushHandler.swift",
        "App/CallOutcomeReporter.swift",
        "App/IncomingCallReporter.swift",
        "Shared/PendingCallOutcomesFile.swift",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(ios.join(f)).unwrap())
    .collect();
    let swift = squash(&swift);

    // Constructors and functions called with labels: the same labels, in the same order.
    for (declared, called) in [
        ("publicconvenienceinit(providerConfiguration:", "tryPushProvider("),
        ("publicfuncdecideVoipPush(", "decideVoipPush("),
        ("publicstructVoipPayload:", "VoipPayload("),
        ("publicstructKnownCall:", "KnownCall("),
        ("publicstructLastSeen:", "returnLastSeen("),
        ("publicstructCallOutcomeReport:", "=CallOutcomeReport("),
        ("publicfuncaddPendingCallOutcome(", "addPendingCallOutcome("),
        ("publicfuncremovePendingCallOutcome(", "removePendingCallOutcome("),
    ] {
        let at = binding
            .find(declared)
            .unwrap_or_else(|| panic!("{declared} not generated"));
        // A record's memberwise initializer follows its fields.
        let opening = if declared.starts_with("publicstruct") {
            "publicinit("
        } else {
            "("
        };
        let theirs = labels(&binding[at..], opening);
        assert_eq!(labels(&swift, called), theirs, "{called} against {declared}");
    }

    // Methods, callbacks, fields and cases the Swift files use, as the binding declares them.
    for (declared, used) in [
        ("funcstart()asyncthrows", "core.start()"),
        ("funcstop(reason:Int64)async", "stop(reason:Int64("),
        ("funchandleTimerEvent()", "handleTimerEvent()"),
        (
            "funcnetworkChanged(change:NetworkChange)",
            "networkChanged(change:",
        ),
        ("caseviable", ".viable"),
        ("casenotViable", ".notViable"),
        ("funcsetVoipToken(token:String)", "setVoipToken(token:"),
        (
            "funcreportIncomingCall(userInfoPlist:Data)",
            "funcreportIncomingCall(userInfoPlist:Data)",
        ),
        (
            "funcshowNotification(notification:LocalNotification)",
            "funcshowNotification(notification:LocalNotification)",
        ),
        (
            "funcpersistLastSeen(lastSeen:LastSeen)",
            "funcpersistLastSeen(lastSeen:LastSeen)",
        ),
        ("publicvarepoch:UInt64", "lastSeen.epoch"),
        ("publicvarseq:UInt64", "lastSeen.seq"),
        (
            "funcstateChanged(state:ConnectionState)",
            "funcstateChanged(state:ConnectionState)",
        ),
        ("publicvarthreadId:String", "notification.threadId"),
        ("publicvartimeSensitive:Bool", "notification.timeSensitive"),
        ("publicvarsender:String", "notification.sender"),
        ("publicvarcategory:String", "notification.category"),
        ("casestopped(cause:StopCause)", ".stopped(cause:"),
        ("casecredentialRevoked", ".credentialRevoked"),
        ("caseauthFailed", ".authFailed"),
        ("casereport(ringForMs:Int64)", ".report(letringForMs)"),
        // Call outcomes: the app's report, the extension's hand-over and the reply's deletion.
        (
            "funcreportPendingCallOutcomes(file:Data)->UInt32",
            "reportPendingCallOutcomes(file:",
        ),
        (
            "funcaddPendingCallOutcome(file:Data,report:CallOutcomeReport)throws->Data",
            "tryaddPendingCallOutcome(file:",
        ),
        (
            "funcremovePendingCallOutcome(file:Data,callId:String,outcome:CallOutcome)->Data",
            "removePendingCallOutcome(file:",
        ),
        (
            "funccallOutcomeReplied(reply:CallOutcomeReply)",
            "funccallOutcomeReplied(reply:CallOutcomeReply)",
        ),
        ("publicvarcallId:String", "reply.callId"),
        ("publicvaroutcome:CallOutcome", "reply.outcome"),
        ("caseanswered", ".answered"),
        ("casedeclined", ".declined"),
        ("casemissed", ".missed"),
        ("caseended", ".ended"),
        ("casereportAndEnd(", ".reportAndEnd"),
        ("casecompleteOnly(", ".completeOnly"),
    ] {
        assert!(binding.contains(declared), "the binding lacks {declared}");
        assert!(swift.contains(used), "the Swift files no longer use {used}");
    }
}
