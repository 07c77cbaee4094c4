// Container app: enroll this phone with the site's push-server and save the NEAppPushManager(s)
// the enrollment describes. Run it once after installation (and again when the extension flags
// `needsEnrollment` in the app group: credential revoked or refused).
//
// Where the enrollment URL, key and CA come from: the MDM's managed app configuration
// (UserDefaults "com.apple.configuration.managed"), so no secret ships in the app binary:
//   lpushEnrollURL  https://push.ward.local:7445/v1/enroll
//   lpushEnrollKey  an API key with the `enroll` scope (new device ids only)
//   lpushCA         the site CA certificate (PEM); the same CA secures the device sessions

import Foundation
import NetworkExtension
import Security

enum EnrollmentError: Error {
    case notManaged(String)
    case server(Int, String)
    case malformed(String)
}

final class PushManagerInstaller: NSObject, URLSessionDelegate {
    /// The extension's bundle identifier.
    static let providerBundleIdentifier = "org.example.lpush.push-provider"

    private let anchor: SecCertificate

    init(caPEM: String) throws {
        let base64 = caPEM
            .components(separatedBy: "\n")
            .filter { !$0.hasPrefix("-----") }
            .joined()
        guard let der = Data(base64Encoded: base64),
              let cert = SecCertificateCreateWithData(nil, der as CFData)
        else { throw EnrollmentError.notManaged("lpushCA is not a PEM certificate") }
        anchor = cert
    }

    /// Enroll `deviceId` and save one push manager per group of at most 10 SSIDs. Returns the
    /// server's warnings (for example a site with more SSIDs than one manager takes).
    func enrollAndSave(deviceId: String, groups: [String]) async throws -> [String] {
        let managed = UserDefaults.standard.dictionary(forKey: "com.apple.configuration.managed") ?? [:]
        guard let urlString = managed["lpushEnrollURL"] as? String, let url = URL(string: urlString),
              let key = managed["lpushEnrollKey"] as? String
        else { throw EnrollmentError.notManaged("lpushEnrollURL and lpushEnrollKey are not configured") }

        var request = URLRequest(url: url)
        request.httpMethod = "POST"
        request.setValue("Bearer \(key)", forHTTPHeaderField: "Authorization")
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
        request.httpBody = try JSONSerialization.data(withJSONObject: ["deviceId": deviceId, "groups": groups])
        let session = URLSession(configuration: .ephemeral, delegate: self, delegateQueue: nil)
        let (body, response) = try await session.data(for: request)
        let status = (response as? HTTPURLResponse)?.statusCode ?? 0
        guard status == 200 else {
            throw EnrollmentError.server(status, String(decoding: body, as: UTF8.self))
        }
        guard let enrollment = try PropertyListSerialization.propertyList(from: body, format: nil) as? [String: Any],
              let providerConfiguration = enrollment["providerConfiguration"] as? [String: Any],
              let managers = enrollment["managers"] as? [[String: Any]]
        else { throw EnrollmentError.malformed("not an lpush enrollment") }

        // Replace what an earlier enrollment saved: as many managers as the site needs.
        let existing = try await NEAppPushManager.loadAllFromPreferences()
        for stale in existing.dropFirst(managers.count) {
            try await stale.removeFromPreferences()
        }
        for (index, description) in managers.enumerated() {
            let manager = index < existing.count ? existing[index] : NEAppPushManager()
            manager.localizedDescription = description["localizedDescription"] as? String ?? "Local push"
            manager.providerBundleIdentifier = Self.providerBundleIdentifier
            // Exactly as the server sent them: spaces and unicode are part of an SSID.
            manager.matchSSIDs = description["matchSSIDs"] as? [String] ?? []
            manager.providerConfiguration = providerConfiguration
            manager.isEnabled = true
            try await manager.saveToPreferences()
        }
        return enrollment["warnings"] as? [String] ?? []
    }

    // Trust only the site CA for the enrollment request.
    func urlSession(
        _ session: URLSession, didReceive challenge: URLAuthenticationChallenge,
        completionHandler: @escaping (URLSession.AuthChallengeDisposition, URLCredential?) -> Void
    ) {
        guard challenge.protectionSpace.authenticationMethod == NSURLAuthenticationMethodServerTrust,
              let trust = challenge.protectionSpace.serverTrust
        else { return completionHandler(.performDefaultHandling, nil) }
        SecTrustSetAnchorCertificates(trust, [anchor] as CFArray)
        SecTrustSetAnchorCertificatesOnly(trust, true)
        if SecTrustEvaluateWithError(trust, nil) {
            completionHandler(.useCredential, URLCredential(trust: trust))
        } else {
            completionHandler(.cancelAuthenticationChallenge, nil)
        }
    }
}
