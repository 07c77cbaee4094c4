//! The ops dashboard: login roles and CSRF over plain HTTPS, the calls API (live and recent calls,
//! one call, a device's call history), and in headless Chromium (Debian's
//! `chromium` + `chromium-driver`, installed by `.ci/run`) the live device table following
//! devices that connect and drop, with a screenshot saved under the target directory
//! (`UPDATE_SCREENSHOT=1` writes `docs/dashboard.png` instead).

mod common;

use std::{path::PathBuf, process::Stdio, time::Duration};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use push_proto::{
    device::{CallOutcome, CallOutcomeResult, push},
    sender::{
        CreateApiKeyRequest, DeliveryState, DeviceList, EscalationStep, PlaceCallRequest, RotateCaRequest,
        Target, target,
    },
};
use push_server::client::DeviceClient;
use serde_json::{Value, json};

/// Longest wait for the page to reach a state.
const PAGE_WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn login_roles_and_csrf() {
    let h = Harness::start().await;
    h.issue("phone-1", &[]).await;
    let reader = h
        .admin()
        .create_api_key(CreateApiKeyRequest {
            name: "ward-screen".into(),
            scopes: vec!["read".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let sender = h
        .admin()
        .create_api_key(CreateApiKeyRequest {
            name: "nurse-call".into(),
            scopes: vec!["send".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let json_ct = ("content-type", "application/json");
    let login = |key: String| {
        let h = &h;
        async move {
            let body = json!({ "api_key": key }).to_string();
            h.https("POST", "/api/login", &[json_ct], &body).await
        }
    };
    assert_eq!(h.https("GET", "/api/overview", &[], "").await.0, 401);
    assert_eq!(login("lpk_nope".into()).await.0, 401);
    assert_eq!(
        login(sender).await.0,
        401,
        "a send-only key cannot use the dashboard"
    );

    let (status, head, body) = login(reader).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"role\":\"read\""), "{body}");
    let set_cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict"] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }
    let cookie = set_cookie
        .split_once(':')
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .trim()
        .to_string();
    let (status, _, body) = h.https("GET", "/api/overview", &[("cookie", &cookie)], "").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"device_id\":\"phone-1\""), "{body}");
    assert!(body.contains("\"node\":\"test-node\""), "{body}");
    let revoke = "/api/devices/phone-1/revoke";
    let csrf = ("x-lpush-csrf", "1");
    assert_eq!(
        h.https("POST", revoke, &[("cookie", &cookie), csrf], "").await.0,
        403,
        "read-only"
    );

    let (_, head, _) = login(h.admin_key()).await;
    let admin_cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        h.https("POST", revoke, &[("cookie", &admin_cookie)], "").await.0,
        403,
        "a cookie without the CSRF header changes nothing"
    );
    assert!(!h.list_devices("", false).await[0].revoked);
    let (status, _, body) = h
        .https("POST", revoke, &[("cookie", &admin_cookie), csrf], "")
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(h.list_devices("", false).await[0].revoked);

    h.https("POST", "/api/logout", &[("cookie", &admin_cookie)], "")
        .await;
    assert_eq!(
        h.https("GET", "/api/me", &[("cookie", &admin_cookie)], "")
            .await
            .0,
        401
    );
}

/// `GET path` with the admin key as a bearer token; the status and the JSON body.
async fn get_json(h: &Harness, path: &str) -> (u16, Value) {
    let auth = format!("Bearer {}", h.admin_key());
    let (status, _, body) = h.https("GET", path, &[("authorization", &auth)], "").await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, json)
}

#[tokio::test]
async fn a_device_enrolled_before_the_previous_ca_rotation_is_flagged_for_re_enrollment() {
    let mut h = Harness::start().await;
    h.issue("early", &[]).await;
    let rotate = |h: &Harness| {
        let mut admin = h.admin();
        async move { admin.rotate_ca(RotateCaRequest {}).await.unwrap().into_inner() }
    };
    let first = rotate(&h).await;
    h.issue("late", &[]).await;
    let second = rotate(&h).await;
    assert_eq!((first.generation, second.generation), (1, 2));
    // The dashboard's listener presents the new CA at once.
    h.ca = second.ca_certificate.clone();
    let flagged = |device: &Value| {
        let flags = device["device"]["flags"].as_array().unwrap().clone();
        (
            device["device"]["ca_generation"].as_u64().unwrap(),
            flags.contains(&json!("needs_re-enrollment")),
        )
    };
    let (_, early) = get_json(&h, "/api/devices/early").await;
    let (_, late) = get_json(&h, "/api/devices/late").await;
    assert_eq!(flagged(&early), (0, true), "{early}");
    assert_eq!(flagged(&late), (1, false), "{late}");
    // Enrolled again, it pins the CA of today.
    h.issue("early", &[]).await;
    let (_, early) = get_json(&h, "/api/devices/early").await;
    assert_eq!(flagged(&early), (2, false), "{early}");
}

/// The callees of a call view as `(device, status, path)`, by device.
fn callees(call: &Value) -> Vec<(String, String, String)> {
    let mut all: Vec<_> = call["callees"]
        .as_array()
        .unwrap_or_else(|| panic!("no callees: {call}"))
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("device_id"), s("status"), s("path"))
        })
        .collect();
    all.sort();
    all
}

fn owned(rows: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

#[tokio::test]
async fn calls_api_shows_the_live_call_then_who_answered_it() {
    let h = Harness::start().await;
    let mut a = h.device("nurse-a").await;
    let mut b = h.device("nurse-b").await;
    h.issue("charge", &[]).await;
    assert_eq!(h.https("GET", "/api/calls", &[], "").await.0, 401);

    let placed_before = push_server::hub::now_ms();
    h.sender()
        .place_call(PlaceCallRequest {
            call_id: "code-blue".into(),
            target: Some(Target {
                kind: Some(target::Kind::Devices(DeviceList {
                    device_ids: vec!["nurse-a".into(), "nurse-b".into()],
                })),
            }),
            caller_name: "Bed 12".into(),
            ring_timeout_seconds: 60,
            escalation: vec![EscalationStep {
                target: Some(to("charge")),
                after_seconds: 40,
                stop_earlier: false,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    for phone in [&mut a, &mut b] {
        let invite = next(phone).await;
        assert!(
            matches!(invite.body, Some(push::Body::CallInvite(_))),
            "{invite:?}"
        );
        phone.ack(&[invite.seq]).await.unwrap();
    }
    h.await_state("code-blue", "nurse-a", DeliveryState::Acked).await;
    h.await_state("code-blue", "nurse-b", DeliveryState::Acked).await;

    // Ringing: listed live, both phones ringing over the local session.
    let (status, list) = get_json(&h, "/api/calls").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["recent"], json!([]), "{list}");
    let live = &list["live"][0];
    assert_eq!(live["call_id"], "code-blue", "{list}");
    assert_eq!(live["state"], "ringing");
    assert_eq!(live["caller_name"], "Bed 12");
    assert_eq!(
        callees(live),
        owned(&[("nurse-a", "ringing", "local"), ("nurse-b", "ringing", "local")])
    );

    // nurse-a answers: nurse-b is told to stop.
    let reply = within(a.report_call("code-blue", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(reply.result(), CallOutcomeResult::Recorded, "{reply:?}");
    let cancel = next(&mut b).await;
    assert!(
        matches!(cancel.body, Some(push::Body::CallCancel(_))),
        "{cancel:?}"
    );
    let answered_after = push_server::hub::now_ms();

    let (_, list) = get_json(&h, "/api/calls").await;
    assert_eq!(list["live"], json!([]), "{list}");
    let call = &list["recent"][0];
    assert_eq!(call["call_id"], "code-blue", "{list}");
    assert_eq!(call["state"], "answered");
    assert_eq!(call["answered_by"], "nurse-a");
    let to_answer = call["time_to_answer_ms"].as_i64().expect("a time to answer");
    assert!(
        (0..=answered_after - placed_before).contains(&to_answer),
        "{to_answer} ms"
    );
    assert_eq!(
        callees(call),
        owned(&[
            ("nurse-a", "answered", "local"),
            ("nurse-b", "cancelled", "local")
        ])
    );
    // Step 0 rang at once; the escalation step was due 40 s later and never rang.
    let steps = call["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{call}");
    assert!(steps[0]["started_at_ms"].as_i64().is_some(), "{call}");
    assert_eq!(steps[1]["started_at_ms"], Value::Null, "{call}");
    assert_eq!(steps[1]["device_ids"], json!(["charge"]));
    assert_eq!(
        steps[1]["due_at_ms"].as_i64().unwrap() - steps[0]["due_at_ms"].as_i64().unwrap(),
        40_000
    );

    // The one call, whole: the same picture.
    let (status, one) = get_json(&h, "/api/calls/code-blue").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["answered_by"], "nurse-a");
    assert_eq!(callees(&one), callees(call));
    assert_eq!(get_json(&h, "/api/calls/no-such-call").await.0, 404);

    // Each phone's history has the call, with its own part in it.
    let (_, detail) = get_json(&h, "/api/devices/nurse-b").await;
    let mine = &detail["calls"][0];
    assert_eq!(mine["call_id"], "code-blue", "{detail}");
    assert_eq!(
        (&mine["status"], &mine["call_state"], &mine["answered_by"]),
        (&json!("cancelled"), &json!("answered"), &json!("nurse-a"))
    );
    let (_, detail) = get_json(&h, "/api/devices/nurse-a").await;
    assert_eq!(detail["calls"][0]["status"], "answered", "{detail}");
    let (_, detail) = get_json(&h, "/api/devices/charge").await;
    assert_eq!(
        detail["calls"],
        json!([]),
        "the escalation never rang it: {detail}"
    );
}

/// A program on PATH, or a failure that says how to install it.
fn require(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{program}` is not installed: the dashboard browser test needs Debian's chromium and chromedriver \
                 (`apt-get install -y chromium chromium-driver`, which .ci/run does)"
            )
        })
}

/// Poll `script` (a JS expression) until it is true, or fail with what the page shows.
async fn wait_until(c: &Client, what: &str, script: &str) {
    let deadline = tokio::time::Instant::now() + PAGE_WAIT;
    loop {
        let v = c.execute(&format!("return !!({script});"), vec![]).await.unwrap();
        if v.as_bool() == Some(true) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let table = c
                .execute("return document.querySelector('#devices') ? document.querySelector('#devices').innerText : document.body.innerText;", vec![])
                .await
                .unwrap();
            panic!(
                "page never showed {what}; it shows:\n{}",
                table.as_str().unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn row_state(device: &str, state: &str) -> String {
    format!("document.querySelector('tr[data-device=\"{device}\"]')?.dataset.state === '{state}'")
}

async fn connect_on(h: &Harness, device: &str, ssid: &str, sdk: &str) -> DeviceClient {
    let credential = h.issue(device, &["ward:4B"]).await;
    let mut opts = h.options(&credential, 0);
    opts.hello.ssid = ssid.into();
    opts.hello.sdk_version = sdk.into();
    within(DeviceClient::connect(opts))
        .await
        .expect("device connects")
}

#[tokio::test]
async fn browser_sees_devices_connect_and_drop_live() {
    let chromium = require("chromium");
    let chromedriver = require("chromedriver");
    let h = Harness::start().await;
    let mut bed12 = connect_on(&h, "phone-bed12", "Ward 4B", "lpush-sdk/0.3.1").await;
    let _station = connect_on(&h, "phone-station", "Ward 4B", "lpush-sdk/0.3.1").await;
    let _icu = connect_on(&h, "phone-icu-1", "ICU", "lpush-sdk/0.3.0").await;
    h.issue("phone-spare", &["ward:4B"]).await;

    // chromedriver on a free port, ready once it accepts connections.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut driver = tokio::process::Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    within(async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1500,1000",
                // The test's CA is not in the browser's store; production users trust the CA.
                "--ignore-certificate-errors",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    caps.insert("acceptInsecureCerts".into(), json!(true));
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a chromium session");

    let base = format!("https://localhost:{}/", h.http_addr().port());
    c.goto(&base).await.unwrap();
    wait_until(&c, "the login form", "!document.querySelector('#login').hidden").await;
    c.find(Locator::Css("#api-key"))
        .await
        .unwrap()
        .send_keys(&h.admin_key())
        .await
        .unwrap();
    c.find(Locator::Css("#login-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until(&c, "phone-bed12 online", &row_state("phone-bed12", "online")).await;
    wait_until(
        &c,
        "the live stream",
        "document.querySelector('#live').classList.contains('on')",
    )
    .await;
    wait_until(&c, "phone-spare offline", &row_state("phone-spare", "offline")).await;

    // A device connects after the page loaded: its row turns online without a reload.
    let spare = connect_on(&h, "phone-spare", "ICU", "lpush-sdk/0.3.1").await;
    wait_until(
        &c,
        "phone-spare online (live)",
        &row_state("phone-spare", "online"),
    )
    .await;

    // A message and a call to bed 12, acknowledged: the row shows the call's path.
    let sent = h.send("phone-bed12", "Patient asks for you").await;
    let p = next(&mut bed12).await;
    bed12.ack(&[p.seq]).await.unwrap();
    h.await_state(&sent.message_id, "phone-bed12", DeliveryState::Acked)
        .await;
    h.sender()
        .place_call(PlaceCallRequest {
            call_id: "call-bed12".into(),
            target: Some(to("phone-bed12")),
            caller_name: "Dr. Okafor".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let invite = next(&mut bed12).await;
    bed12.ack(&[invite.seq]).await.unwrap();
    wait_until(
        &c,
        "bed 12's last call path",
        "document.querySelector('tr[data-device=\"phone-bed12\"]')?.innerText.includes('local (acked)')",
    )
    .await;

    // A device drops: its row turns offline with the reason, without a reload.
    spare.close().await.unwrap();
    wait_until(
        &c,
        "phone-spare offline (live)",
        &row_state("phone-spare", "offline"),
    )
    .await;
    wait_until(
        &c,
        "the stop reason",
        "document.querySelector('tr[data-device=\"phone-spare\"] .reason')?.innerText.includes('CLIENT_STOPPING')",
    )
    .await;
    let reloads = c
        .execute(
            "return performance.getEntriesByType('navigation').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(reloads, json!(1), "updates arrived without a reload");
    wait_until(
        &c,
        "the ICU site with both its devices",
        "document.querySelector('#sites tbody').innerText.includes('1 / 2')",
    )
    .await;
    wait_until(
        &c,
        "the latency chart",
        "document.querySelectorAll('#chart-latency rect[height]:not([height=\"0\"])').length > 0",
    )
    .await;

    let png = c.screenshot().await.unwrap();
    let out = if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png")
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png")
    };
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");

    // The calls view: bed 12's call rings over the local session, then bed 12 answers it and
    // it moves to the recent calls, live.
    c.goto(&format!("{base}#calls")).await.unwrap();
    wait_until(
        &c,
        "bed 12's call ringing",
        "document.querySelector('#calls-live tr[data-call=\"call-bed12\"] .chip[data-device=\"phone-bed12\"]')?.innerText === 'phone-bed12 ringing · local'",
    )
    .await;
    let reply = within(bed12.report_call("call-bed12", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(reply.result(), CallOutcomeResult::Recorded, "{reply:?}");
    wait_until(
        &c,
        "bed 12's call answered",
        "document.querySelector('#calls-recent tr[data-call=\"call-bed12\"]')?.dataset.state === 'answered' \
         && document.querySelector('#calls-recent .chip[data-device=\"phone-bed12\"]')?.dataset.status === 'answered'",
    )
    .await;
    let shown = c
        .execute("return document.querySelector('#calls-box').innerText;", vec![])
        .await
        .unwrap();
    let shown = shown.as_str().unwrap_or_default();
    assert!(
        shown
            .split(|c: char| !c.is_ascii_digit())
            .all(|run| run.len() < 13),
        "times are for people, not raw Unix ms:\n{shown}"
    );
    c.goto(&format!("{base}#call/call-bed12")).await.unwrap();
    wait_until(
        &c,
        "the call's page naming who answered",
        "document.querySelector('#call-facts [data-fact=\"Answered by\"]')?.innerText.includes('phone-bed12')",
    )
    .await;

    // The device page: its session history, deliveries and calls.
    c.goto(&format!("{base}#device/phone-bed12")).await.unwrap();
    wait_until(
        &c,
        "bed 12's call history",
        "document.querySelector('#detail-calls tr[data-call=\"call-bed12\"]')?.innerText.includes('answered · local')",
    )
    .await;
    wait_until(
        &c,
        "bed 12's deliveries",
        "document.querySelector('#detail-deliveries tbody')?.innerText.includes('call-bed12')",
    )
    .await;
    wait_until(
        &c,
        "bed 12's sessions",
        "document.querySelector('#detail-sessions tbody')?.rows.length >= 1",
    )
    .await;
    wait_until(
        &c,
        "the revoke button for admins",
        "!document.querySelector('#revoke').hidden",
    )
    .await;

    c.close().await.unwrap();
    let _ = driver.kill().await;
}
