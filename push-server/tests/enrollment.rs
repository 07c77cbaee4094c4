//! Enrollment: what a container app receives to save its push managers, over gRPC and HTTPS.

use push_proto::sender::{EnrollDeviceRequest, Enrollment, SendMessageRequest};
use push_server::{api_client::ApiClient, hub::now_ms};
use testkit::harness::*;
use tonic::Code;

const SITE_SSIDS: [&str; 12] = [
    " Ward 4B ",
    "Station Ünfall 🚑",
    "ICU",
    "ER-2.4",
    "ER-5",
    "OR",
    "Radiology",
    "Pharmacy",
    "Lab",
    "Maternity",
    "Oncology",
    "Staff Lounge",
];

async fn site() -> Harness {
    Harness::start_with(|c| {
        c.site.ssids = SITE_SSIDS.iter().map(|s| s.to_string()).collect();
        c.site.device_host = "localhost".into();
    })
    .await
}

/// A client with a new key; an enroll key may enroll into ward:4B.
async fn key(h: &Harness, scopes: &[&str]) -> ApiClient {
    let groups: &[&str] = if scopes.contains(&"enroll") {
        &["ward:4B"]
    } else {
        &[]
    };
    key_with(h, &format!("{scopes:?}"), scopes, groups).await.1
}

/// A new key with enroll groups: the key and a client using it.
async fn key_with(h: &Harness, name: &str, scopes: &[&str], groups: &[&str]) -> (String, ApiClient) {
    let key = h.create_key(name, scopes, groups).await.api_key;
    (key.clone(), h.client(&key).await)
}

fn request(device_id: &str) -> EnrollDeviceRequest {
    EnrollDeviceRequest {
        device_id: device_id.into(),
        groups: vec!["ward:4B".into()],
        valid_days: 30,
    }
}

#[tokio::test]
async fn enrollment_carries_everything_and_the_credential_works() {
    let h = site().await;
    let app = key(&h, &["enroll"]).await;
    let e: Enrollment = app
        .admin()
        .enroll_device(request("phone-1"))
        .await
        .unwrap()
        .into_inner();
    let p = e.provider_configuration.clone().unwrap();
    let server = h.server.as_ref().unwrap();
    assert_eq!(
        (p.host.as_str(), p.port),
        ("localhost", u32::from(server.device_addr.port()))
    );
    assert_eq!(p.device_id, "phone-1");
    assert_eq!(p.ca_certificate, h.ca);
    assert_eq!(
        p.pins,
        [server.pki.ca_pin.clone(), server.pki.next_ca_pin.clone()]
    );
    assert_eq!(p.match_ssids, SITE_SSIDS, "spaces and unicode kept as configured");

    // Twelve SSIDs: two managers (10 + 2), and the installer is told why.
    let split: Vec<usize> = e.managers.iter().map(|m| m.match_ssids.len()).collect();
    assert_eq!(split, [10, 2]);
    let all: Vec<&str> = e
        .managers
        .iter()
        .flat_map(|m| &m.match_ssids)
        .map(String::as_str)
        .collect();
    assert_eq!(all, SITE_SSIDS);
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("12 SSIDs") && w.contains("at most 10")),
        "{:?}",
        e.warnings
    );
    let thirty_days_ms = 30 * 86_400_000;
    let now = push_server::hub::now_ms();
    assert!((e.credential_expires_at_ms - now - thirty_days_ms).abs() < 60_000);

    // The property list holds the same, with the keys the provider reads.
    let plist: plist::Dictionary = plist::from_bytes(e.plist.as_bytes()).unwrap();
    let provider = plist["providerConfiguration"].as_dictionary().unwrap();
    assert_eq!(provider["credential"].as_string(), Some(p.credential.as_str()));
    assert_eq!(provider["port"].as_unsigned_integer(), Some(u64::from(p.port)));
    assert_eq!(provider["matchSSIDs"].as_array().unwrap().len(), 12);
    assert_eq!(
        plist["managers"].as_array().unwrap()[1].as_dictionary().unwrap()["matchSSIDs"]
            .as_array()
            .unwrap()[1]
            .as_string(),
        Some("Staff Lounge")
    );

    // The credential logs in and the groups took effect.
    let mut phone = h.connect(&p.credential, 0).await.unwrap();
    h.send_req(SendMessageRequest {
        target: Some(push_proto::sender::Target {
            kind: Some(push_proto::sender::target::Kind::Group("ward:4B".into())),
        }),
        body: "welcome".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(body(&next(&mut phone).await), "welcome");
}

#[tokio::test]
async fn an_enroll_key_enrolls_new_devices_only_and_can_do_nothing_else() {
    let h = site().await;
    let app = key(&h, &["enroll"]).await;
    app.admin().enroll_device(request("phone-1")).await.unwrap();
    let again = app.admin().enroll_device(request("phone-1")).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    // An admin may re-enroll it.
    h.admin().enroll_device(request("phone-1")).await.unwrap();

    let send = app
        .sender()
        .send_message(SendMessageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(send.code(), Code::PermissionDenied);
    let sender = key(&h, &["send"]).await;
    let denied = sender
        .admin()
        .enroll_device(request("phone-2"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let bad = app.admin().enroll_device(request("bad\nid")).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        h.list_devices("", false)
            .await
            .iter()
            .all(|d| d.device_id != "phone-2")
    );
}

#[tokio::test]
async fn https_enrollment_returns_a_property_list() {
    let h = site().await;
    let app_key = h
        .create_key("container app", &["enroll"], &["ward:4B"])
        .await
        .api_key;
    let auth = format!("Bearer {app_key}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, head, body) = h
        .https(
            "POST",
            "/v1/enroll",
            &headers,
            r#"{"deviceId":"phone-9","groups":["ward:4B"]}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/x-plist"),
        "{head}"
    );
    let plist: plist::Dictionary = plist::from_bytes(body.as_bytes()).unwrap();
    assert_eq!(plist["deviceId"].as_string(), Some("phone-9"));
    let credential = plist["providerConfiguration"].as_dictionary().unwrap()["credential"]
        .as_string()
        .unwrap()
        .to_string();
    h.connect(&credential, 0)
        .await
        .expect("the enrolled credential logs in");

    let (status, _, body) = h
        .https("POST", "/v1/enroll", &headers, r#"{"deviceId":"phone-9"}"#)
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, _, _) = h
        .https(
            "POST",
            "/v1/enroll",
            &[("content-type", "application/json")],
            r#"{"deviceId":"x"}"#,
        )
        .await;
    assert_eq!(status, 401);
    let (status, _, _) = h.https("POST", "/v1/enroll", &headers, r#"{"device":"x"}"#).await;
    assert_eq!(status, 422, "unknown fields are refused");
}

#[tokio::test]
async fn a_site_without_host_or_ssids_is_enrolled_with_warnings() {
    let h = Harness::start().await;
    let e = h
        .admin()
        .enroll_device(request("phone-1"))
        .await
        .unwrap()
        .into_inner();
    // The test server listens on 127.0.0.1, which is what phones are told.
    assert_eq!(e.provider_configuration.unwrap().host, "127.0.0.1");
    assert!(e.managers.is_empty());
    assert!(
        e.warnings.iter().any(|w| w.contains("site.ssids is empty")),
        "{:?}",
        e.warnings
    );
}

fn groups_of(devices: &[push_proto::sender::DeviceInfo], id: &str) -> Option<Vec<String>> {
    devices
        .iter()
        .find(|d| d.device_id == id)
        .map(|d| d.groups.clone())
}

#[tokio::test]
async fn an_enroll_key_enrolls_only_into_its_groups_and_up_to_the_lifetime_cap() {
    let h = Harness::start_with(|c| c.limits.max_enroll_credential_days = 30).await;
    let (_, app) = key_with(&h, "mdm ward 4B", &["enroll"], &["ward:4B", "site:north"]).await;
    let ask = |id: &str, groups: &[&str], valid_days| EnrollDeviceRequest {
        device_id: id.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        valid_days,
    };
    for groups in [&["icu"][..], &["ward:4B", "icu"]] {
        let e = app
            .admin()
            .enroll_device(ask("phone-1", groups, 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("\"icu\""), "{e:?}");
    }
    assert_eq!(
        groups_of(&h.list_devices("", false).await, "phone-1"),
        None,
        "nothing registered"
    );

    let cap_ms = now_ms() + 30 * 86_400_000;
    let all = app
        .admin()
        .enroll_device(ask("phone-2", &[], 3650))
        .await
        .unwrap()
        .into_inner();
    assert!(
        all.credential_expires_at_ms <= cap_ms + 60_000,
        "{}",
        all.credential_expires_at_ms
    );
    assert!(
        all.warnings
            .iter()
            .any(|w| w.contains("max_enroll_credential_days")),
        "{:?}",
        all.warnings
    );
    let credential = all.provider_configuration.unwrap().credential;
    let claims = h.authority().verify(&credential).unwrap();
    assert!(
        claims.exp as i64 * 1000 <= cap_ms + 60_000,
        "the credential itself is capped"
    );
    let one = app
        .admin()
        .enroll_device(ask("phone-3", &["site:north"], 0))
        .await
        .unwrap()
        .into_inner();
    assert!(one.credential_expires_at_ms <= cap_ms + 60_000);

    let devices = h.list_devices("", false).await;
    assert_eq!(
        groups_of(&devices, "phone-2").unwrap(),
        ["ward:4B", "site:north"],
        "no groups asked: all of the key's"
    );
    assert_eq!(groups_of(&devices, "phone-3").unwrap(), ["site:north"]);

    // An admin is not held to an enroll key's rules.
    let admin = h
        .admin()
        .enroll_device(ask("phone-4", &["icu"], 3650))
        .await
        .unwrap()
        .into_inner();
    assert!(admin.credential_expires_at_ms > cap_ms + 86_400_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enrollments_of_one_new_id_register_it_once() {
    let h = Harness::start_with(|c| c.limits.enrollments_per_key_per_minute = 10_000).await;
    let app = key(&h, &["enroll"]).await;
    for round in 0..10 {
        let id = format!("phone-{round}");
        let attempts = (0..6).map(|_| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.admin().enroll_device(request(&id)).await })
        });
        let results = futures::future::join_all(attempts).await;
        let mut credentials = Vec::new();
        for r in results {
            match r.unwrap() {
                Ok(e) => credentials.push(e.into_inner().provider_configuration.unwrap().credential),
                Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
            }
        }
        assert_eq!(
            credentials.len(),
            1,
            "round {round}: exactly one enrollment of {id}"
        );
        h.connect(&credentials[0], 0)
            .await
            .expect("the one credential works");
    }
}

#[tokio::test]
async fn enrollments_are_rate_limited_per_key() {
    let h = Harness::start_with(|c| {
        c.limits.enrollments_per_key_per_minute = 3;
        c.site.device_host = "localhost".into();
    })
    .await;
    let (flooding_key, flooding) = key_with(&h, "leaked", &["enroll"], &["ward:4B"]).await;
    let other = key(&h, &["enroll"]).await;
    for i in 0..3 {
        flooding
            .admin()
            .enroll_device(request(&format!("junk-{i}")))
            .await
            .unwrap();
    }
    let e = flooding
        .admin()
        .enroll_device(request("junk-3"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let auth = format!("Bearer {flooding_key}");
    let (status, _, body) = h
        .https(
            "POST",
            "/v1/enroll",
            &[("authorization", &auth), ("content-type", "application/json")],
            r#"{"deviceId":"junk-4"}"#,
        )
        .await;
    assert_eq!(status, 429, "{body}");
    other
        .admin()
        .enroll_device(request("phone-1"))
        .await
        .expect("another key still enrolls");
    let devices = h.list_devices("", false).await;
    assert!(groups_of(&devices, "junk-3").is_none() && groups_of(&devices, "junk-4").is_none());
}

#[tokio::test]
async fn every_enrollment_is_listed_on_the_dashboard() {
    let h = site().await;
    let (app_key, app) = key_with(&h, "mdm-ward-4B", &["enroll"], &["ward:4B"]).await;
    let e = app
        .admin()
        .enroll_device(request("phone-7"))
        .await
        .unwrap()
        .into_inner();
    let credential = e.provider_configuration.unwrap().credential;
    h.issue("phone-8", &[]).await;

    let admin = format!("Bearer {}", h.admin_key());
    let (status, _, body) = h
        .https("GET", "/api/enrollments", &[("authorization", &admin)], "")
        .await;
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows = listed["enrollments"].as_array().unwrap();
    let row = rows.iter().find(|r| r["device_id"] == "phone-7").expect("listed");
    assert_eq!(row["key_name"], "mdm-ward-4B");
    assert_eq!(row["kind"], "enroll");
    assert!(row["source"].as_str().unwrap().starts_with("127.0.0.1:"), "{row}");
    assert!(row["at_ms"].as_i64().unwrap() > 0);
    assert!(
        rows.iter()
            .any(|r| r["device_id"] == "phone-8" && r["kind"] == "issue"),
        "{body}"
    );
    assert!(
        !body.contains(&credential) && !body.contains(&app_key),
        "no secrets listed"
    );

    // The enroll key itself cannot read the list.
    let (status, _, _) = h
        .https(
            "GET",
            "/api/enrollments",
            &[("authorization", &format!("Bearer {app_key}"))],
            "",
        )
        .await;
    assert_eq!(status, 401);
}
