// In both targets (app and extension): the app group's pending call outcomes, the one channel
// from the container app to the extension (NEAppPushProvider has no app-to-provider messages).
// The format is Rust's (nepush-provider/src/outcomes.rs), through the binding's functions; this
// file only does the I/O. Both processes change the file, so every change is one coordinated
// read-modify-write: an append by the app never interleaves with a delete by the extension.

import Foundation
import LpushSDK

/// Darwin notification the app posts after appending a report; the extension observes it.
/// Darwin notifications carry no payload: the file is the message.
let callOutcomesChangedNotification = "org.example.lpush.callOutcomesChanged"

enum PendingCallOutcomesFile {
    static var url: URL {
        FileManager.default.containerURL(forSecurityApplicationGroupIdentifier: appGroup)!
            .appendingPathComponent("pendingCallOutcomes.plist")
    }

    /// The file's bytes; empty when there is no file yet (the functions read that as none).
    static func read() -> Data {
        var data = Data()
        var error: NSError?
        NSFileCoordinator(filePresenter: nil).coordinate(readingItemAt: url, options: [], error: &error) { url in
            data = (try? Data(contentsOf: url)) ?? Data()
        }
        if let error { NSLog("lpush: pending call outcomes not read: \(error)") }
        return data
    }

    /// Replace the file with `change(current)`, the other process kept out meanwhile.
    static func update(_ change: (Data) throws -> Data) {
        var error: NSError?
        NSFileCoordinator(filePresenter: nil).coordinate(writingItemAt: url, options: .forMerging, error: &error) { url in
            let current = (try? Data(contentsOf: url)) ?? Data()
            do {
                // Atomic: a process killed mid-write leaves the previous file, never half of one.
                try change(current).write(to: url, options: .atomic)
            } catch {
                NSLog("lpush: pending call outcomes not written: \(error)")
            }
        }
        if let error { NSLog("lpush: pending call outcomes not coordinated: \(error)") }
    }
}
