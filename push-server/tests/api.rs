//! The sender API: authentication and scopes, device listing, presence, health, reflection.

use push_proto::sender::{CreateApiKeyRequest, ListDevicesRequest, SendMessageRequest};
use testkit::harness::*;

#[tokio::test]
async fn api_keys_are_required_and_scoped() {
    let h = Harness::start().await;
    h.issue("phone-1", &[]).await;
    let nobody = h.client("lpk_wrong").await;
    let err = list_devices_as(&nobody).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let reader = h
        .client(&h.create_key("dashboard", &["read"], &[]).await.api_key)
        .await;
    assert_eq!(
        reader
            .sender()
            .list_devices(ListDevicesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .devices
            .len(),
        1
    );
    let err = reader
        .sender()
        .send_message(SendMessageRequest {
            target: Some(to("phone-1")),
            body: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = reader
        .admin()
        .create_api_key(CreateApiKeyRequest {
            name: "escalate".into(),
            scopes: vec!["admin".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = h
        .admin()
        .create_api_key(CreateApiKeyRequest {
            name: "typo".into(),
            scopes: vec!["sned".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn device_listing_and_presence_follow_sessions() {
    let h = Harness::start().await;
    let mut presence = h.presence().await;
    let phone = h.device("phone-1").await;
    h.issue("phone-2", &["ward:4B"]).await;
    let online = within(presence.message()).await.unwrap().unwrap();
    assert_eq!(
        (online.device_id.as_str(), online.online, online.ssid.as_str()),
        ("phone-1", true, "Ward 4B")
    );

    let devices = h.list_devices("", false).await;
    let ids: Vec<_> = devices.iter().map(|d| (d.device_id.as_str(), d.online)).collect();
    assert_eq!(ids, [("phone-1", true), ("phone-2", false)]);
    assert_eq!(devices[0].sdk_version, "test/1");
    let ward = h.list_devices("ward:4B", false).await;
    assert_eq!(ward.len(), 1);
    assert_eq!(ward[0].device_id, "phone-2");

    phone.close().await.unwrap();
    let offline = within(presence.message()).await.unwrap().unwrap();
    assert_eq!((offline.device_id.as_str(), offline.online), ("phone-1", false));
    assert!(offline.reason.contains("CLIENT_STOPPING"), "{}", offline.reason);
    let online_only = h.list_devices("", true).await;
    assert!(online_only.is_empty());
}

#[tokio::test]
async fn health_and_reflection_answer_for_grpcurl_style_tools() {
    let h = Harness::start().await;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let status = HealthClient::new(h.api.channel())
        .check(HealthCheckRequest {
            service: "lpush.sender.v1.PushSender".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(h.api.channel())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = within(responses.message())
        .await
        .unwrap()
        .unwrap()
        .message_response
    else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["lpush.sender.v1.PushSender", "lpush.sender.v1.PushAdmin"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}
