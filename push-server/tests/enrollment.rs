//! Enrollment: what a container app receives to save its push managers, over gRPC and HTTPS.

mod common;

use common::*;
use push_proto::sender::{CreateApiKeyRequest, EnrollDeviceRequest, Enrollment, SendMessageRequest};
use push_server::api_client::ApiClient;
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

async fn key(h: &Harness, scopes: &[&str]) -> ApiClient {
    let key = h
        .admin()
        .create_api_key(CreateApiKeyRequest {
            name: format!("{scopes:?}"),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let addr = h.server.as_ref().unwrap().api_addr;
    ApiClient::connect(addr, "localhost", &h.ca, &key).await.unwrap()
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
        .admin()
        .create_api_key(CreateApiKeyRequest {
            name: "container app".into(),
            scopes: vec!["enroll".into()],
        })
        .await
        .unwrap()
        .into_inner()
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
