// The NEAppPushProvider subclass: a thin shell over the Rust provider core (`PushProvider`
// from the generated binding, module LpushSDK). Everything it decides lives in Rust and is tested on Linux
// (nepush-provider/scenarios); this file only forwards iOS's calls and performs the host's
// side effects: report a call, show a notification, persist the last seen sequence and its
// epoch, and carry the app's call outcomes (the app group's pending file) to the server.

import Foundation
import LpushSDK  // the Swift package build-xcframework.sh produces (generated binding + xcframework)
import Network
import NetworkExtension
import UserNotifications

/// App group shared by the container app and the extension (entitlement
/// com.apple.security.application-groups).
let appGroup = "group.org.example.lpush"

/// The floor and its epoch, from one app-group key (so a floor is never read back under another
/// store's epoch). An app group written before epochs holds only "lastSeenSeq": that floor
/// with epoch 0, which the server never takes as an acknowledgement.
func persistedLastSeen(_ group: UserDefaults) -> LastSeen {
    if let stored = group.dictionary(forKey: "lastSeen"),
       let epoch = stored["epoch"] as? Int, let seq = stored["seq"] as? Int {
        return LastSeen(epoch: UInt64(epoch), seq: UInt64(seq))
    }
    return LastSeen(epoch: 0, seq: UInt64(group.integer(forKey: "lastSeenSeq")))
}

/// Info.plist: NSExtensionPointIdentifier com.apple.networkextension.app-push,
/// NSExtensionPrincipalClass $(PRODUCT_MODULE_NAME).LocalPushProvider.
final class LocalPushProvider: NEAppPushProvider {
    private var core: PushProvider?
    private let pathMonitor = NWPathMonitor(requiredInterfaceType: .wifi)

    override func start() {
        guard let configuration = providerConfiguration,
              let plist = try? PropertyListSerialization.data(
                  fromPropertyList: configuration, format: .binary, options: 0)
        else {
            NSLog("lpush: no providerConfiguration; re-enroll the app")
            return
        }
        let group = UserDefaults(suiteName: appGroup)!
        do {
            // The callbacks hold this instance weakly: no retain cycle, so iOS can free the
            // instance (the field reports of instances that never deinit).
            let core = try PushProvider(
                providerConfiguration: plist,
                persistedLastSeen: persistedLastSeen(group),
                host: Callbacks(provider: self, group: group))
            if let token = group.string(forKey: "voipToken") {
                core.setVoipToken(token: token)
            }
            // Outcomes the app recorded while no instance ran (or that were never replied to).
            _ = core.reportPendingCallOutcomes(file: PendingCallOutcomesFile.read())
            self.core = core
            observeCallOutcomes()
            // A newer instance for the same device stops this process's older one first.
            Task { try? await core.start() }
        } catch {
            NSLog("lpush: unusable providerConfiguration: \(error)")
        }
        pathMonitor.pathUpdateHandler = { [weak self] path in
            self?.core?.networkChanged(change: path.status == .satisfied ? .viable : .notViable)
        }
        pathMonitor.start(queue: .global(qos: .utility))
    }

    override func stop(with reason: NEProviderStopReason, completionHandler: @escaping () -> Void) {
        pathMonitor.cancel()
        stopObservingCallOutcomes()
        let core = self.core
        self.core = nil
        Task {
            // Returns once the goodbye is sent, the socket closed and the task gone.
            await core?.stop(reason: Int64(reason.rawValue))
            completionHandler()
        }
    }

    // A backstop only: the SDK reconnects on its own schedule.
    override func handleTimerEvent() {
        core?.handleTimerEvent()
    }

    /// The app posts a Darwin notification after appending to the pending file: hand the
    /// whole file over (the SDK ignores reports it already has).
    private func observeCallOutcomes() {
        // Unretained: removed in stop and deinit, so it never outlives this instance.
        let observer = Unmanaged.passUnretained(self).toOpaque()
        CFNotificationCenterAddObserver(
            CFNotificationCenterGetDarwinNotifyCenter(), observer,
            { _, observer, _, _, _ in
                guard let observer else { return }
                let provider = Unmanaged<LocalPushProvider>.fromOpaque(observer).takeUnretainedValue()
                _ = provider.core?.reportPendingCallOutcomes(file: PendingCallOutcomesFile.read())
            },
            callOutcomesChangedNotification as CFString, nil, .deliverImmediately)
    }

    private func stopObservingCallOutcomes() {
        CFNotificationCenterRemoveObserver(
            CFNotificationCenterGetDarwinNotifyCenter(), Unmanaged.passUnretained(self).toOpaque(),
            CFNotificationName(callOutcomesChangedNotification as CFString), nil)
    }

    deinit {
        pathMonitor.cancel()
        stopObservingCallOutcomes()
    }
}

/// The host side of the provider core. Called on an SDK thread; a push counts as taken (and
/// is acknowledged to the server) when the call returns.
final class Callbacks: ProviderHostCallbacks {
    private weak var provider: NEAppPushProvider?
    private let group: UserDefaults

    init(provider: NEAppPushProvider, group: UserDefaults) {
        self.provider = provider
        self.group = group
    }

    func reportIncomingCall(userInfoPlist: Data) {
        guard let userInfo = try? PropertyListSerialization.propertyList(
            from: userInfoPlist, options: [], format: nil) as? [AnyHashable: Any]
        else { return }
        // iOS hands the same dictionary to the container app's
        // appPushManager(_:didReceiveIncomingCallWithUserInfo:), which reports it to CallKit.
        provider?.reportIncomingCall(userInfo: userInfo)
    }

    func showNotification(notification: LocalNotification) {
        let content = UNMutableNotificationContent()
        content.title = notification.title
        content.subtitle = notification.sender
        content.body = notification.body
        content.threadIdentifier = notification.threadId
        content.categoryIdentifier = notification.category
        content.sound = .default
        if notification.timeSensitive { content.interruptionLevel = .timeSensitive }
        // The id makes a replayed push replace, never duplicate, the notification.
        UNUserNotificationCenter.current().add(
            UNNotificationRequest(identifier: notification.id, content: content, trigger: nil))
    }

    func persistLastSeen(lastSeen: LastSeen) {
        // One key, one write: both halves or neither (both stay below 2^53, so Int holds them).
        group.set(["epoch": Int(lastSeen.epoch), "seq": Int(lastSeen.seq)], forKey: "lastSeen")
    }

    func callOutcomeReplied(reply: CallOutcomeReply) {
        // Replied: never hand it over again. (A refused answer also came as an "end" through
        // reportIncomingCall, which the app turns into the end of the CallKit call.)
        PendingCallOutcomesFile.update {
            removePendingCallOutcome(file: $0, callId: reply.callId, outcome: reply.outcome)
        }
    }

    func stateChanged(state: ConnectionState) {
        switch state {
        case .stopped(cause: .credentialRevoked), .stopped(cause: .authFailed):
            // The container app shows "re-enroll this phone" when it sees this flag.
            group.set(true, forKey: "needsEnrollment")
        default:
            break
        }
    }
}
