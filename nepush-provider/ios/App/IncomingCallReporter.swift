// Container app: calls that arrive over the site's Wi-Fi. The provider calls
// reportIncomingCall(userInfo:); iOS launches the app (if needed) and hands the same dictionary
// to appPushManager(_:didReceiveIncomingCallWithUserInfo:), which reports it to CallKit. Keys:
// see nepush-provider/README.md ("The call dictionary").

import CallKit
import Foundation
import NetworkExtension

final class IncomingCallReporter: NSObject, NEAppPushDelegate {
    private let provider: CXProvider
    /// Calls reported to CallKit, by UUID, so the PushKit path (VoipPushHandler) does not ring
    /// a call twice and a cancellation finds its call.
    private(set) var reported = Set<UUID>()
    private(set) var cancelled = Set<UUID>()

    init(provider: CXProvider) {
        self.provider = provider
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
            provider.reportNewIncomingCall(with: uuid, update: update) { error in
                if let error { NSLog("lpush: CallKit refused the call: \(error)") }
            }
            // Stop ringing on the server's schedule, not the phone's clock.
            DispatchQueue.main.asyncAfter(deadline: .now() + .milliseconds(ringRemainingMs)) { [weak self] in
                self?.end(uuid, reason: .unanswered)
            }
        case "cancel":
            cancelled.insert(uuid)
            let reason: CXCallEndedReason =
                switch userInfo["reason"] as? String {
                case "answeredElsewhere": .answeredElsewhere
                case "declinedElsewhere": .declinedElsewhere
                default: .remoteEnded
                }
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
