//! API keys over real TLS: listing without secrets, revocation that takes effect at once (calls,
//! open streams, dashboard sessions), expiry, keys stored by the previous release, and device
//! credentials re-issued over an old one.

use push_proto::{
    device::GoodbyeReason,
    sender::{ApiKeyInfo, ApiKeyState, ListApiKeysRequest, RevokeApiKeyRequest, WatchPresenceRequest},
};
use push_server::{
    auth::api_key_hash,
    client::ClientError,
    hub::now_ms,
    store::{ApiKeyRecord, Op, RedbStore, Store},
};
use serde_json::json;
use testkit::harness::*;
use tonic::Code;

async fn create(h: &Harness, name: &str, scopes: &[&str]) -> (String, String) {
    let r = h.create_key(name, scopes, &[]).await;
    (r.api_key, r.key_id)
}

async fn list(h: &Harness) -> Vec<ApiKeyInfo> {
    h.admin()
        .list_api_keys(ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
}

/// Log in to the dashboard with `key`; the session cookie.
async fn dashboard_login(h: &Harness, key: &str) -> String {
    let body = json!({ "api_key": key }).to_string();
    let (status, head, body) = h
        .https(
            "POST",
            "/api/login",
            &[("content-type", "application/json")],
            &body,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    head.lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a session cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_revoked_key_is_refused_at_once_and_its_stream_and_dashboard_session_end() {
    let h = Harness::start().await;
    let (key, id) = create(&h, "ward-screen", &["read"]).await;
    let screen = h.client(&key).await;
    let mut presence = screen
        .sender()
        .watch_presence(WatchPresenceRequest {})
        .await
        .unwrap()
        .into_inner();
    let cookie = dashboard_login(&h, &key).await;
    assert_eq!(h.https("GET", "/api/me", &[("cookie", &cookie)], "").await.0, 200);
    // Just used, so verified and cached: revocation must not wait for the cache to age.
    list_devices_as(&screen).await.unwrap();

    // Listing shows the id (a short prefix of the hash), never the key or the whole hash.
    let listed = list(&h).await;
    let text = format!("{listed:?}");
    assert!(
        !text.contains(&key) && !text.contains(&api_key_hash(&key)),
        "{text}"
    );
    let mine = listed.iter().find(|k| k.name == "ward-screen").unwrap();
    assert_eq!(
        (mine.key_id.as_str(), mine.state()),
        (id.as_str(), ApiKeyState::Active)
    );
    assert!(listed.iter().all(|k| k.key_id.len() == 12), "{listed:?}");
    let (_, _, dashboard_list) = h
        .https(
            "GET",
            "/api/keys",
            &[("authorization", &format!("Bearer {}", h.admin_key()))],
            "",
        )
        .await;
    assert!(dashboard_list.contains(&id), "{dashboard_list}");
    assert!(!dashboard_list.contains(&api_key_hash(&key)), "{dashboard_list}");

    let revoked = h
        .admin()
        .revoke_api_key(RevokeApiKeyRequest { key_id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(revoked.state(), ApiKeyState::Revoked);

    let refused = list_devices_as(&screen).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    let ended = within(presence.message()).await.unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert_eq!(
        h.https("GET", "/api/me", &[("cookie", &cookie)], "").await.0,
        401,
        "the key's dashboard session is over"
    );
    let (status, _, body) = h
        .https(
            "POST",
            "/api/login",
            &[("content-type", "application/json")],
            &json!({ "api_key": key }).to_string(),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    // Revoking again changes nothing; an unknown or malformed id is refused.
    h.admin()
        .revoke_api_key(RevokeApiKeyRequest { key_id: id.clone() })
        .await
        .unwrap();
    for (bad, code) in [("000000000000", Code::NotFound), ("zz", Code::InvalidArgument)] {
        let e = h
            .admin()
            .revoke_api_key(RevokeApiKeyRequest { key_id: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
}

#[tokio::test]
async fn the_last_admin_key_cannot_be_revoked_and_the_dashboard_revokes_for_admins() {
    let h = Harness::start().await;
    let admin_id = list(&h).await[0].key_id.clone();
    let e = h
        .admin()
        .revoke_api_key(RevokeApiKeyRequest {
            key_id: admin_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    let (sender_key, sender_id) = create(&h, "nurse-call", &["send"]).await;
    let cookie = dashboard_login(&h, &h.admin_key()).await;
    let path = format!("/api/keys/{sender_id}/revoke");
    let csrf = ("x-lpush-csrf", "1");
    assert_eq!(
        h.https("POST", &path, &[("cookie", &cookie)], "").await.0,
        403,
        "no CSRF header, no change"
    );
    let (status, _, body) = h.https("POST", &path, &[("cookie", &cookie), csrf], "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"revoked\""), "{body}");
    let e = list_devices_as(&h.client(&sender_key).await).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

/// Write key records into the store at `cfg.data_dir` before the server opens it.
fn preload(data_dir: &std::path::Path, keys: Vec<(String, ApiKeyRecord)>) {
    std::fs::create_dir_all(data_dir).unwrap();
    let path = data_dir.join("push.redb");
    // On a thread of its own: the store's answer is awaited blocking, outside the runtime.
    std::thread::scope(|s| {
        s.spawn(|| {
            let store = RedbStore::open(&path).unwrap();
            let ops = keys
                .into_iter()
                .map(|(key, record)| Op::PutApiKey {
                    hash: api_key_hash(&key),
                    record,
                })
                .collect();
            store.submit(ops).blocking_recv().unwrap().unwrap();
            store.close();
        });
    });
}

#[tokio::test]
async fn expired_keys_are_refused_and_their_streams_end_at_expiry() {
    let expired = "lpk_expired-key-for-the-test".to_string();
    let expiring = "lpk_expiring-key-for-the-test".to_string();
    let now = now_ms();
    let record = |name: &str, expires_at_ms| ApiKeyRecord {
        expires_at_ms,
        ..ApiKeyRecord::new(name, vec!["read".into()], now - 10_000)
    };
    let keys = vec![
        (expired.clone(), record("old-screen", now - 1_000)),
        (expiring.clone(), record("temp-screen", now + 4_000)),
    ];
    let h = Harness::start_with(|c| preload(&c.data_dir, keys)).await;

    let e = list_devices_as(&h.client(&expired).await).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired at"), "{e:?}");
    let listed = list(&h).await;
    let state = |name: &str| listed.iter().find(|k| k.name == name).unwrap().state();
    assert_eq!(state("old-screen"), ApiKeyState::Expired);
    assert_eq!(state("temp-screen"), ApiKeyState::Active);

    // A stream opened with a key that expires ends at the expiry, not at the next request.
    let mut presence = h
        .client(&expiring)
        .await
        .sender()
        .watch_presence(WatchPresenceRequest {})
        .await
        .unwrap()
        .into_inner();
    let ended = within(presence.message()).await.unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("expired"), "{ended:?}");
}

#[tokio::test]
async fn keys_stored_by_the_previous_release_still_work() {
    // The previous release stored keys in table "api_keys" as postcard (name, scopes, created).
    #[derive(serde::Serialize)]
    struct Legacy {
        name: String,
        scopes: Vec<String>,
        created_at_ms: i64,
    }
    let key = "lpk_admin-key-written-by-the-previous-release".to_string();
    let write_old_store = |data_dir: &std::path::Path| {
        std::fs::create_dir_all(data_dir).unwrap();
        let db = redb::Database::create(data_dir.join("push.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("api_keys");
            let mut t = txn.open_table(table).unwrap();
            let old = Legacy {
                name: "admin".into(),
                scopes: vec!["admin".into()],
                created_at_ms: 1_700_000_000_000,
            };
            let bytes = postcard::to_allocvec(&old).unwrap();
            t.insert(api_key_hash(&key).as_str(), bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        // The CLI and the harness read the admin key from here; the server creates none.
        std::fs::write(data_dir.join("admin.key"), &key).unwrap();
    };
    let h = Harness::start_with(|c| write_old_store(&c.data_dir)).await;
    assert_eq!(h.admin_key(), key);
    h.issue("phone-1", &[]).await;
    assert_eq!(h.list_devices("", false).await.len(), 1);
    let listed = list(&h).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (
            listed[0].name.as_str(),
            listed[0].state(),
            listed[0].expires_at_ms
        ),
        ("admin", ApiKeyState::Active, 0)
    );
}

#[tokio::test]
async fn a_reissued_credential_replaces_the_old_one_and_the_new_phone_keeps_its_session() {
    let h = Harness::start().await;
    let old = h.issue("phone-1", &["ward:4B"]).await;
    let mut old_phone = h.connect(&old, 0).await.unwrap();

    // The phone is reinstalled (or replaced) and gets a new credential.
    let new = h.issue("phone-1", &["ward:4B"]).await;
    match within(old_phone.next_push()).await {
        Err(ClientError::Goodbye { reason, .. }) => assert_eq!(reason, GoodbyeReason::CredentialRevoked),
        other => panic!("the old credential's session must end, got {other:?}"),
    }
    let mut new_phone = h.connect(&new, 0).await.unwrap();

    // The old install comes back with its old credential: refused, and the new phone is not
    // replaced.
    match h.connect(&old, 0).await {
        Err(ClientError::Goodbye { reason, .. }) => assert!(
            matches!(
                reason,
                GoodbyeReason::CredentialRevoked | GoodbyeReason::AuthFailed
            ),
            "{reason:?}"
        ),
        Err(other) => panic!("expected CREDENTIAL_REVOKED, got {other}"),
        Ok(_) => panic!("the old credential still logs in"),
    }
    h.send("phone-1", "still here").await;
    assert_eq!(body(&next(&mut new_phone).await), "still here");
    let device = &h.list_devices("", false).await[0];
    assert!(device.online && !device.revoked, "{device:?}");
}

#[tokio::test]
async fn the_store_lists_keys_in_the_versioned_format() {
    // The record round-trips with every new field through a real store file.
    let dir = tempfile::tempdir().unwrap();
    let record = ApiKeyRecord {
        expires_at_ms: 5,
        revoked_at_ms: 6,
        enroll_groups: vec!["ward:4B".into()],
        ..ApiKeyRecord::new("mdm", vec!["enroll".into()], 1)
    };
    preload(dir.path(), vec![("lpk_x".into(), record.clone())]);
    let store = RedbStore::open(&dir.path().join("push.redb")).unwrap();
    assert_eq!(store.api_keys().unwrap(), vec![(api_key_hash("lpk_x"), record)]);
}
