// Container app: what the user did with a call, for the server (which decides who has the call,
// and tells the caller and the other phones). The CXProviderDelegate of the app's one
// CXProvider, for calls from both paths (the site's Wi-Fi and PushKit).
//
// The report goes to the extension through the app group: appended to the pending file, then a
// Darwin notification. The extension hands the file to the SDK, which sends each report on its
// session, and again on every later session, until the server replies; then the extension
// deletes it. A report made off-site or while the extension is stopped waits in the file.

import CallKit
import Foundation
import LpushSDK

final class CallOutcomeReporter: NSObject, CXProviderDelegate {
    private enum Phase { case ringing, answered, finished }

    /// Call id (the server's) and phase of each call reported to CallKit, by CallKit UUID.
    private var calls = [UUID: (callId: String, phase: Phase)]()

    init(provider: CXProvider) {
        super.init()
        provider.setDelegate(self, queue: .main)
    }

    /// A call was reported to CallKit and rings (IncomingCallReporter, VoipPushHandler).
    func ringing(_ uuid: UUID, callId: String) {
        if calls[uuid] == nil { calls[uuid] = (callId, .ringing) }
    }

    /// The ring deadline passed. Returns true if the call still rang: the caller ends it as
    /// unanswered, and it is reported MISSED. False once the user acted or the server ended it.
    func ringTimedOut(_ uuid: UUID) -> Bool {
        guard calls[uuid]?.phase == .ringing else { return false }
        finish(uuid, report: .missed)
        return true
    }

    /// The server ended the call (cancel, or refused answer): nothing to report.
    func endedByServer(_ uuid: UUID) {
        calls[uuid]?.phase = .finished
    }

    func providerDidReset(_ provider: CXProvider) {
        for uuid in calls.keys { calls[uuid]?.phase = .finished }
    }

    func provider(_ provider: CXProvider, perform action: CXAnswerCallAction) {
        if calls[action.callUUID]?.phase == .ringing {
            calls[action.callUUID]?.phase = .answered
            record(action.callUUID, .answered)
        }
        // The call is the user's until the server says otherwise (a reply of
        // ANSWERED_ELSEWHERE or CALL_ENDED comes back as an "end" and ends it).
        action.fulfill()
    }

    func provider(_ provider: CXProvider, perform action: CXEndCallAction) {
        switch calls[action.callUUID]?.phase {
        case .ringing: finish(action.callUUID, report: .declined)
        case .answered: finish(action.callUUID, report: .ended)
        case .finished, nil: break
        }
        action.fulfill()
    }

    private func finish(_ uuid: UUID, report outcome: CallOutcome) {
        calls[uuid]?.phase = .finished
        record(uuid, outcome)
    }

    private func record(_ uuid: UUID, _ outcome: CallOutcome) {
        guard let callId = calls[uuid]?.callId else { return }
        let report = CallOutcomeReport(
            callId: callId, outcome: outcome, atMs: Int64(Date().timeIntervalSince1970 * 1000))
        PendingCallOutcomesFile.update { try addPendingCallOutcome(file: $0, report: report) }
        CFNotificationCenterPostNotification(
            CFNotificationCenterGetDarwinNotifyCenter(),
            CFNotificationName(callOutcomesChangedNotification as CFString), nil, nil, true)
    }
}
