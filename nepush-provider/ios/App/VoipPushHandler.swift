// Container app: the APNs VoIP fallback for calls when the phone is off-site. iOS kills an app
// that receives a VoIP push and does not report a call to CallKit, so every push goes through
// the SDK's decision (`decideVoipPush`, tested in Rust): report and ring, report and end at
// once, or (only where iOS 26.4+ says mustReport is false) complete without reporting.

import CallKit
import Foundation
import LpushSDK
import PushKit

final class VoipPushHandler: NSObject, PKPushRegistryDelegate {
    private let provider: CXProvider
    private let calls: IncomingCallReporter
    private let outcomes: CallOutcomeReporter
    private let registry = PKPushRegistry(queue: .main)

    init(provider: CXProvider, calls: IncomingCallReporter, outcomes: CallOutcomeReporter) {
        self.provider = provider
        self.calls = calls
        self.outcomes = outcomes
        super.init()
        registry.delegate = self
        registry.desiredPushTypes = [.voIP]
    }

    func pushRegistry(_ registry: PKPushRegistry, didUpdate credentials: PKPushCredentials, for type: PKPushType) {
        // The extension reads it at start and sends it over its session (VoipToken frame).
        let hex = credentials.token.map { String(format: "%02x", $0) }.joined()
        UserDefaults(suiteName: appGroup)!.set(hex, forKey: "voipToken")
    }

    func pushRegistry(_ registry: PKPushRegistry, didInvalidatePushTokenFor type: PKPushType) {
        UserDefaults(suiteName: appGroup)!.set("", forKey: "voipToken")
    }

    func pushRegistry(
        _ registry: PKPushRegistry, didReceiveIncomingPushWith payload: PKPushPayload,
        for type: PKPushType, completion: @escaping () -> Void
    ) {
        // Before iOS 26.4 there is no metadata: nil means "must report". On 26.4+, forward
        // PKVoIPPushMetadata.mustReport from the delegate variant that carries it (its exact
        // signature could not be checked here: see the README).
        handle(payload, mustReport: nil, completion: completion)
    }

    func handle(_ payload: PKPushPayload, mustReport: Bool?, completion: @escaping () -> Void) {
        let l = payload.dictionaryPayload["lpush"] as? [String: Any] ?? [:]
        let uuid = UUID(uuidString: l["call_uuid"] as? String ?? "") ?? UUID()
        let voip = VoipPayload(
            version: UInt32(l["v"] as? Int ?? 0),
            callId: l["call_id"] as? String ?? "",
            callUuid: uuid.uuidString,
            callerName: l["caller_name"] as? String ?? "",
            callerHandle: l["caller_handle"] as? String ?? "",
            video: l["video"] as? Bool ?? false,
            createdAtMs: l["created_at_ms"] as? Int64 ?? 0,
            ringDeadlineMs: l["ring_deadline_ms"] as? Int64 ?? 0)
        let known = KnownCall(reported: calls.reported.contains(uuid), cancelled: calls.cancelled.contains(uuid))
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let update = CXCallUpdate()
        update.localizedCallerName = voip.callerName
        update.remoteHandle = CXHandle(type: .generic, value: voip.callerHandle)
        update.hasVideo = voip.video

        switch decideVoipPush(payload: voip, mustReport: mustReport, nowMs: now, known: known) {
        case .report(let ringForMs):
            // Answered or declined off-site, the outcome waits in the app group until the
            // extension next reaches the server.
            outcomes.ringing(uuid, callId: voip.callId)
            provider.reportNewIncomingCall(with: uuid, update: update) { _ in completion() }
            DispatchQueue.main.asyncAfter(deadline: .now() + .milliseconds(Int(ringForMs))) { [provider, outcomes] in
                guard outcomes.ringTimedOut(uuid) else { return }
                provider.reportCall(with: uuid, endedAt: Date(), reason: .unanswered)
            }
        case .reportAndEnd:
            // A report with a fresh UUID when this one is already on screen: iOS still sees a
            // reported call, and the visible call is left alone.
            let reportUUID = known.reported ? UUID() : uuid
            provider.reportNewIncomingCall(with: reportUUID, update: update) { [provider] _ in
                provider.reportCall(with: reportUUID, endedAt: Date(), reason: .remoteEnded)
                completion()
            }
        case .completeOnly:
            completion()
        }
    }
}
