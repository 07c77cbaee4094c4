//! No secret, credential or cookie ever shows in the server's log, its metrics or an error
//! message, even at debug level.
//!
//! One full session against the real `push-server` binary (`RUST_LOG=debug`) with a remote
//! `apns-bridge` process: API keys created, devices enrolled over gRPC and HTTPS and issued by an
//! admin, a device session with a message and a call (one callee rung through the bridge),
//! dashboard logins (cookies), `/metrics`, a revoke from the dashboard; then every wrong
//! credential, key and cookie we can think of. Afterwards the whole log of both processes, the
//! server's stdout, every `/metrics` text and every error returned (gRPC statuses with their
//! metadata, HTTP error responses, goodbyes) are searched for every secret used: the API keys
//! (right and wrong), the JWTs (right, forged, expired, tampered, revoked) and their signatures,
//! the cookie values, the bridge's API key, the device-credential signing key and the private
//! keys of the CA, the standby CA, the server and the bridge.

use std::path::Path;

use e2e::{ApiClient, BridgeProcess, ClientError, STEP_TIMEOUT, ServerProcess, within};
use push_proto::{
    device::{GoodbyeReason, push},
    sender::{
        CreateApiKeyRequest, EnrollDeviceRequest, PlaceCallRequest, SendMessageRequest, SetVoipTokenRequest,
        Target, target,
    },
};
use push_server::auth::{DeviceAuthority, new_api_key, unix_secs};
use testkit::harness::https;

/// A secret and what it is (the name is what a failure reports).
struct Secret {
    name: String,
    value: String,
}

/// Method, path, headers and body of one HTTPS request.
type HttpRequest<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);

/// Everything a leak could show up in.
struct Haystack {
    name: String,
    text: String,
}

/// Every (secret, haystack, line) where a secret appears. Values shorter than 4 characters are
/// refused: they would match by accident.
fn leaks(secrets: &[Secret], haystacks: &[Haystack]) -> Vec<String> {
    let mut found = Vec::new();
    for s in secrets {
        assert!(s.value.len() >= 4, "secret {} is too short to search for", s.name);
        for h in haystacks {
            for line in h.text.lines().filter(|l| l.contains(&s.value)) {
                found.push(format!("{} appears in {}: {line}", s.name, h.name));
            }
        }
    }
    found
}

fn secret(name: impl Into<String>, value: impl Into<String>) -> Secret {
    Secret {
        name: name.into(),
        value: value.into(),
    }
}

/// A JWT and, separately, its signature (a log that cut the token would still leak that).
fn jwt_secrets(name: &str, token: &str) -> Vec<Secret> {
    let signature = token.rsplit('.').next().expect("a JWT");
    vec![
        secret(name, token),
        secret(format!("{name} (signature)"), signature),
    ]
}

/// The base64 lines of a PEM private key (any one of them is key material).
fn pem_secrets(name: &str, path: &Path) -> Vec<Secret> {
    let pem = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        pem.contains("PRIVATE KEY"),
        "{} is not a private key",
        path.display()
    );
    let lines: Vec<Secret> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .enumerate()
        .map(|(i, l)| secret(format!("{name} (PEM line {})", i + 1), l))
        .collect();
    assert!(!lines.is_empty(), "{} has no key lines", path.display());
    lines
}

fn to(device_id: &str) -> Target {
    Target {
        kind: Some(target::Kind::DeviceId(device_id.into())),
    }
}

/// The session cookie's value from a login response.
fn cookie_of(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie:")
                .then(|| l.split_once(':').unwrap().1.trim())
        })
        .and_then(|v| v.split(';').next())
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(|| panic!("no cookie in {head}"))
}

/// Connecting with `credential` must end in a goodbye with `expected`; returns its detail.
async fn refused(server: &ServerProcess, credential: &str, expected: GoodbyeReason) -> String {
    match server.connect(credential, 0).await {
        Err(ClientError::Goodbye { reason, detail }) => {
            assert_eq!(reason, expected, "goodbye detail: {detail}");
            format!("goodbye {reason:?}: {detail}")
        }
        Err(e) => panic!("expected goodbye {expected:?}, got {e}"),
        Ok(c) => panic!("a bad credential logged in: {:?}", c.server_hello),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_debug_log_metrics_or_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let bridge = BridgeProcess::start(tmp.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let config = tmp.path().join("push.toml");
    std::fs::write(&config, bridge.apns_config()).unwrap();
    let data = tmp.path().join("data");
    let mut server = ServerProcess::start_with_env(
        &data,
        &["--config", config.to_str().unwrap()],
        &[("RUST_LOG", "debug")],
    );
    let ca = server.ca_pem();
    let http = server
        .stdout()
        .iter()
        .find_map(|l| {
            l.split("dashboard=https://")
                .nth(1)
                .map(|a| a.trim_end_matches('/').to_string())
        })
        .expect("a dashboard address in the ready line")
        .parse()
        .unwrap();
    let dash = async |method: &str, path: &str, headers: &[(&str, &str)], body: &str| {
        https(http, &ca, method, path, headers, body).await
    };
    let connect_with = |key: String| {
        let (api_addr, ca) = (server.api_addr, ca.clone());
        async move {
            within(
                "API connect",
                ApiClient::connect(api_addr, "localhost", &ca, &key),
            )
            .await
            .unwrap()
        }
    };
    let mut secrets = Vec::new();
    // Error texts the server returned to someone.
    let mut errors: Vec<String> = Vec::new();
    let mut metrics_texts: Vec<String> = Vec::new();

    // Keys: the bootstrap admin key, and one per role.
    let admin_key = server.admin_key();
    secrets.push(secret("admin API key", &admin_key));
    let admin = server.api().await.admin();
    let create = |name: &'static str, scopes: &[&str]| {
        let mut admin = admin.clone();
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        // An enroll key enrolls only into the groups it was made for.
        let enroll_groups = if scopes.iter().any(|s| s == "enroll") {
            vec!["ward:4B".to_string()]
        } else {
            Vec::new()
        };
        async move {
            within(
                "CreateApiKey",
                admin.create_api_key(CreateApiKeyRequest {
                    name: name.into(),
                    scopes,
                    enroll_groups,
                    ..Default::default()
                }),
            )
            .await
            .unwrap()
            .into_inner()
            .api_key
        }
    };
    let sender_key = create("nurse-call", &["send", "call"]).await;
    let read_key = create("ward-screen", &["read"]).await;
    let enroll_key = create("mdm-app", &["enroll"]).await;
    secrets.push(secret("send/call API key", &sender_key));
    secrets.push(secret("read API key", &read_key));
    secrets.push(secret("enroll API key", &enroll_key));

    // Enrollment over gRPC and HTTPS with the enroll key, and credentials issued by the admin.
    let enrolled = within(
        "EnrollDevice",
        connect_with(enroll_key.clone())
            .await
            .admin()
            .enroll_device(EnrollDeviceRequest {
                device_id: "phone-enrolled".into(),
                groups: vec!["ward:4B".into()],
                valid_days: 0,
            }),
    )
    .await
    .unwrap()
    .into_inner();
    let enrolled_jwt = enrolled.provider_configuration.unwrap().credential;
    secrets.extend(jwt_secrets("credential enrolled over gRPC", &enrolled_jwt));
    let (status, _, plist) = dash(
        "POST",
        "/v1/enroll",
        &[
            ("authorization", &format!("Bearer {enroll_key}")),
            ("content-type", "application/json"),
        ],
        r#"{"deviceId":"phone-http","groups":["ward:4B"]}"#,
    )
    .await;
    assert_eq!(status, 200, "{plist}");
    let http_jwt = plist
        .split("<string>")
        .filter_map(|s| s.split("</string>").next())
        .find(|s| s.starts_with("eyJ"))
        .expect("a credential in the plist")
        .to_string();
    secrets.extend(jwt_secrets("credential enrolled over HTTPS", &http_jwt));
    let phone1_jwt = server.issue("phone-1").await;
    let phone2_jwt = server.issue("phone-2").await;
    secrets.extend(jwt_secrets("phone-1 credential", &phone1_jwt));
    secrets.extend(jwt_secrets("phone-2 credential", &phone2_jwt));
    // phone-2 stays offline with a PushKit token: its call goes through the bridge.
    within(
        "SetVoipToken",
        admin.clone().set_voip_token(SetVoipTokenRequest {
            device_id: "phone-2".into(),
            token: "ab".repeat(32),
        }),
    )
    .await
    .unwrap();

    // A device session: a message and a call from the sender key, both acknowledged.
    let mut phone = server.connect(&phone1_jwt, 0).await.expect("phone-1 logs in");
    let mut sender = connect_with(sender_key.clone()).await.sender();
    within(
        "SendMessage",
        sender.send_message(SendMessageRequest {
            target: Some(to("phone-1")),
            title: "Bed 12".into(),
            body: "Patient asks for you".into(),
            message_id: "msg-1".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let p = within("message push", phone.next_push()).await.unwrap();
    assert!(matches!(p.body, Some(push::Body::Message(_))), "{p:?}");
    within("ack", phone.ack(&[p.seq])).await.unwrap();
    within(
        "PlaceCall",
        sender.place_call(PlaceCallRequest {
            call_id: "call-1".into(),
            target: Some(Target {
                kind: Some(target::Kind::Devices(push_proto::sender::DeviceList {
                    device_ids: vec!["phone-1".into(), "phone-2".into()],
                })),
            }),
            caller_name: "Dr. Okafor".into(),
            caller_handle: "ext 4411".into(),
            video: false,
            ring_timeout_seconds: 20,
            escalation: Vec::new(),
        }),
    )
    .await
    .unwrap();
    let p = within("call push", phone.next_push()).await.unwrap();
    assert!(matches!(p.body, Some(push::Body::CallInvite(_))), "{p:?}");
    within("ack", phone.ack(&[p.seq])).await.unwrap();
    let rung = bridge
        .next_request(STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(rung.contains("call=call-1"), "{rung}");
    // The enrolled device logs in too.
    let enrolled_phone = server
        .connect(&enrolled_jwt, 0)
        .await
        .expect("enrolled device logs in");
    within("close", enrolled_phone.close()).await.unwrap();

    // The dashboard: a reader and an admin log in (cookies), read, scrape, revoke, log out.
    let json = ("content-type", "application/json");
    let (status, head, body) = dash(
        "POST",
        "/api/login",
        &[json],
        &format!(r#"{{"api_key":"{read_key}"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let read_cookie = cookie_of(&head);
    let (status, head, body) = dash(
        "POST",
        "/api/login",
        &[json],
        &format!(r#"{{"api_key":"{admin_key}"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let admin_cookie = cookie_of(&head);
    secrets.push(secret("reader's session cookie", &read_cookie));
    secrets.push(secret("admin's session cookie", &admin_cookie));
    let read_cookie_header = format!("lpush_session={read_cookie}");
    let admin_cookie_header = format!("lpush_session={admin_cookie}");
    for path in ["/api/me", "/api/overview", "/api/devices/phone-1"] {
        let (status, _, body) = dash("GET", path, &[("cookie", &read_cookie_header)], "").await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, _, body) = dash("GET", "/metrics", &[("cookie", &read_cookie_header)], "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("lpush_"), "{body}");
    metrics_texts.push(body);
    let (status, _, body) = dash(
        "GET",
        "/metrics",
        &[("authorization", &format!("Bearer {read_key}"))],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    metrics_texts.push(body);
    let (status, _, body) = dash(
        "POST",
        "/api/devices/phone-http/revoke",
        &[("cookie", &admin_cookie_header), ("x-lpush-csrf", "1")],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Wrong device credentials: forged with another key, expired, tampered, garbage, revoked.
    let forged = DeviceAuthority::from_secret(new_api_key().as_bytes())
        .issue("phone-1", 0, 3600)
        .0;
    let expired = DeviceAuthority::load_or_create(&data)
        .unwrap()
        .issue_until("phone-1", 0, unix_secs() - 60)
        .0;
    let mut tampered = phone1_jwt.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let garbage = format!("not-a-jwt-{}", new_api_key());
    secrets.extend(jwt_secrets("forged credential", &forged));
    secrets.extend(jwt_secrets("expired credential", &expired));
    secrets.push(secret("tampered credential", &tampered));
    secrets.push(secret("garbage credential", &garbage));
    for bad in [&forged, &expired, &tampered, &garbage] {
        errors.push(refused(&server, bad, GoodbyeReason::AuthFailed).await);
    }
    errors.push(refused(&server, &http_jwt, GoodbyeReason::CredentialRevoked).await);
    // A second session of phone-1 replaces the first, which is told so.
    let replacement = server.connect(&phone1_jwt, 2).await.expect("phone-1 again");
    match within("replaced goodbye", phone.next_push()).await {
        Err(e @ ClientError::Goodbye { .. }) => errors.push(e.to_string()),
        other => panic!("expected a REPLACED goodbye, got {other:?}"),
    }
    within("close", replacement.close()).await.unwrap();

    // Wrong API keys over gRPC: unknown, wrong scope, enroll key on an existing device.
    let wrong_key = new_api_key();
    let wrong_odd_key = format!("{}-not-a-key", new_api_key());
    secrets.push(secret("unknown API key", &wrong_key));
    secrets.push(secret("malformed API key", &wrong_odd_key));
    let message = |id: &str| SendMessageRequest {
        target: Some(to("phone-1")),
        body: "x".into(),
        message_id: id.into(),
        ..Default::default()
    };
    for key in [&wrong_key, &wrong_odd_key, &read_key, &enroll_key] {
        let status = within(
            "SendMessage with a wrong key",
            connect_with(key.clone())
                .await
                .sender()
                .send_message(message("msg-wrong")),
        )
        .await
        .expect_err("a wrong key sent a message");
        errors.push(format!("{status:?}"));
    }
    let status = within(
        "re-enroll with the enroll key",
        connect_with(enroll_key.clone())
            .await
            .admin()
            .enroll_device(EnrollDeviceRequest {
                device_id: "phone-1".into(),
                groups: vec![],
                valid_days: 0,
            }),
    )
    .await
    .expect_err("an enroll key re-enrolled a device");
    errors.push(format!("{status:?}"));
    let status = within(
        "CreateApiKey with a send key",
        connect_with(sender_key.clone())
            .await
            .admin()
            .create_api_key(CreateApiKeyRequest {
                name: "sneaky".into(),
                scopes: vec!["admin".into()],
                ..Default::default()
            }),
    )
    .await
    .expect_err("a send key created a key");
    errors.push(format!("{status:?}"));

    // Wrong keys and cookies over HTTPS.
    let wrong_cookie = new_api_key().trim_start_matches("lpk_").to_string();
    secrets.push(secret("unknown session cookie", &wrong_cookie));
    let bearer = |k: &str| format!("Bearer {k}");
    let (wrong_bearer, sender_bearer, read_bearer) =
        (bearer(&wrong_key), bearer(&sender_key), bearer(&read_key));
    let wrong_cookie_header = format!("lpush_session={wrong_cookie}");
    let wrong_login = format!(r#"{{"api_key":"{wrong_key}"}}"#);
    let sender_login = format!(r#"{{"api_key":"{sender_key}"}}"#);
    let enroll_body = r#"{"deviceId":"phone-x","groups":[]}"#;
    let failing: Vec<HttpRequest> = vec![
        ("POST", "/api/login", vec![json], &wrong_login),
        ("POST", "/api/login", vec![json], &sender_login),
        ("GET", "/metrics", vec![("authorization", &wrong_bearer)], ""),
        ("GET", "/metrics", vec![("authorization", &sender_bearer)], ""),
        ("GET", "/api/me", vec![("cookie", &wrong_cookie_header)], ""),
        ("GET", "/api/overview", vec![("cookie", &wrong_cookie_header)], ""),
        (
            "POST",
            "/api/devices/phone-1/revoke",
            vec![("cookie", &read_cookie_header), ("x-lpush-csrf", "1")],
            "",
        ),
        (
            "POST",
            "/v1/enroll",
            vec![("authorization", &wrong_bearer), json],
            enroll_body,
        ),
        (
            "POST",
            "/v1/enroll",
            vec![("authorization", &read_bearer), json],
            enroll_body,
        ),
    ];
    for (method, path, headers, body) in failing {
        let (status, head, text) = dash(method, path, &headers, body).await;
        assert!(
            status >= 400,
            "{method} {path} succeeded with a wrong key: {text}"
        );
        errors.push(format!("{method} {path}: {head}\n{text}"));
    }
    let (status, _, _) = dash("POST", "/api/logout", &[("cookie", &read_cookie_header)], "").await;
    assert_eq!(status, 204);
    let (status, head, text) = dash("GET", "/api/me", &[("cookie", &read_cookie_header)], "").await;
    assert_eq!(status, 401, "a cookie still works after logout: {text}");
    errors.push(format!("GET /api/me after logout: {head}\n{text}"));

    // Key material on disk, and the bridge's key.
    let key_file = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    secrets.push(secret(
        "device credential signing key",
        key_file(&data.join("device-jwt.key")),
    ));
    secrets.push(secret(
        "APNs bridge API key",
        key_file(&tmp.path().join("bridge-api.key")),
    ));
    secrets.extend(pem_secrets("CA private key", &data.join("tls/ca.key")));
    secrets.extend(pem_secrets(
        "standby CA private key",
        &data.join("tls/ca-next.key"),
    ));
    secrets.extend(pem_secrets("server private key", &data.join("tls/server.key")));
    secrets.extend(pem_secrets(
        "bridge private key",
        &tmp.path().join("bridge.key.pem"),
    ));

    // Stop the server so that its log is complete, then look everywhere.
    let status = server.terminate();
    assert!(status.success(), "server exit: {status:?}");
    let log = server.log();
    // The log is the debug-level log of the whole session (else this test proves nothing).
    assert!(log.contains(" DEBUG "), "the server did not log at debug level");
    for event in [
        "session started",
        "device rejected",
        "message accepted",
        "call placed",
        "dashboard login",
        "dashboard login refused",
        "device enrolled",
        "device revoked from the dashboard",
    ] {
        assert!(log.contains(event), "the log has no {event:?} line");
    }
    let mut haystacks = vec![
        Haystack {
            name: "the server's log".into(),
            text: log,
        },
        Haystack {
            name: "the server's stdout".into(),
            text: server.stdout().join("\n"),
        },
        Haystack {
            name: "the bridge's log".into(),
            text: key_file(&tmp.path().join("bridge.log")),
        },
    ];
    haystacks.extend(metrics_texts.into_iter().map(|text| Haystack {
        name: "/metrics".into(),
        text,
    }));
    haystacks.extend(errors.into_iter().map(|text| Haystack {
        name: "an error returned to a client".into(),
        text,
    }));
    // Nothing that even looks like an API key or a JWT, whoever's it is.
    let jwt_header = phone1_jwt.split('.').next().unwrap().to_string();
    secrets.push(secret("any API key (lpk_ prefix)", "lpk_"));
    secrets.push(secret("any JWT (its header)", jwt_header));
    let found = leaks(&secrets, &haystacks);
    assert!(found.is_empty(), "secrets leaked:\n{}", found.join("\n"));
}

#[test]
fn the_search_finds_a_planted_secret() {
    let secrets = [secret("a key", "lpk_0123456789abcdef")];
    let clean = [Haystack {
        name: "log".into(),
        text: "line one\nlpk_0123456789abcde (one short)\n".into(),
    }];
    assert!(leaks(&secrets, &clean).is_empty());
    let dirty = [Haystack {
        name: "log".into(),
        text: "line one\nDEBUG authorization: Bearer lpk_0123456789abcdef\n".into(),
    }];
    assert_eq!(
        leaks(&secrets, &dirty),
        ["a key appears in log: DEBUG authorization: Bearer lpk_0123456789abcdef"]
    );
}
