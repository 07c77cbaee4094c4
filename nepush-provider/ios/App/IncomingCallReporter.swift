// Container app: calls that arrive over the site's Wi-Fi. The provider calls
// reportIncomingCall(userInfo:); iOS launches the app (if needed) and hands the same dictionary
// to appPushManager(_:didReceiveIncomingCallWithUserInfo:), which reports it to CallKit. Keys:
// see nepush-provider/README.md ("The call dictionary"). What the user then does with the call
// goes back to the server through CallOutcomeReporter.

import CallKit
import Foundation
import NetworkExtension

final class IncomingCallReporter: NSObject, NEAppPushDelegate {
    private let provider: CXProvider
    private let outcomes: CallOutcomeReporter
    /// Calls reported to CallKit, by UUID, so the PushKit path (VoipPushHandler) does not ring
    /// a call twice and a cancellation finds its call.
    private(set) var reported = Set<UUID>()
    private(set) var cancelled = Set<UUID>()

    init(provider: CXProvider, outcomes: CallOutcomeReporter) {
        self.provider = provider
        self.outcomes = outcomes
    }

    /// Set as the delegate of every saved NEAppPushManager (after loadAllFromPreferences).
    func attach(to managers: [NEAppPushManager]) {
        for manager in managers { manager.delegate = self }
    }

    func appPushManager(_ manager: NEAppPushManager, didReceiveIncomingCallWithUserInfo userInfo: [AnyHashable: Any] = [:]) {
        guard let uuidString = userInfo["callUUID"] as? String, let uuid = UUID(uuidString: uuidString) else {
            return
        }
        switch userInfo["kind"] as? String {
        case "call":
            let ringRemainingMs = (userInfo["ringRemainingMs"] as? Int) ?? 0
            guard ringRemainingMs > 0, !reported.contains(uuid), !cancelled.contains(uuid) else { return }
            let update = CXCallUpdate()
            update.localizedCallerName = userInfo["callerName"] as? String
            update.remoteHandle = CXHandle(type: .generic, value: userInfo["callerHandle"] as? String ?? "")
            update.hasVideo = userInfo["video"] as? Bool ?? false
            reported.insert(uuid)
            outcomes.ringing(uuid, callId: userInfo["callId"] as? String ?? "")
            provider.reportNewIncomingCall(with: uuid, update: update) { error in
                if let error { NSLog("lpush: CallKit refused the call: \(error)") }
            }
            // Stop ringing on the server's schedule, not the phone's clock.
            // Only if nobody acted on it meanwhile: then it is a missed call (reported MISSED).
            DispatchQueue.main.asyncAfter(deadline: .now() + .milliseconds(ringRemainingMs)) { [weak self] in
                guard let self, self.outcomes.ringTimedOut(uuid) else { return }
                self.end(uuid, reason: .unanswered)
            }
        case "cancel":
            cancelled.insert(uuid)
            // "missed": the provider also shows a missed-call notification; "escalated": the
            // call moved to its next step, so the ring just stops.
            let reason: CXCallEndedReason =
                switch userInfo["reason"] as? String {
                case "answeredElsewhere": .answeredElsewhere
                case "declinedElsewhere": .declinedElsewhere
                case "missed": .unanswered
                default: .remoteEnded
                }
            outcomes.endedByServer(uuid)
            end(uuid, reason: reason)
        case "end":
            // The server refused this phone's answer (another phone answered first, or the
            // call had already ended): the user must not stay in a call nobody is on.
            let reason: CXCallEndedReason = userInfo["reason"] as? String == "answeredElsewhere" ? .answeredElsewhere : .remoteEnded
            outcomes.endedByServer(uuid)
            end(uuid, reason: reason)
        default:
            return
        }
    }

    private func end(_ uuid: UUID, reason: CXCallEndedReason) {
        guard reported.contains(uuid) else { return }
        provider.reportCall(with: uuid, endedAt: Date(), reason: reason)
    }
}
