//! The ops dashboard: login roles and CSRF over plain HTTPS, the calls API (live and recent calls,
//! one call, a device's call history), and in headless Chromium (Debian's
//! `chromium` + `chromium-driver`, installed by `.ci/run`) the live device table following
//! devices that connect and drop, with a screenshot saved under the target directory
//! (`UPDATE_SCREENSHOT=1` writes `docs/dashboard.png` instead).

use std::{path::PathBuf, process::Stdio, time::Duration};

use fantoccini::{Client, ClientBuilder, Locator};
use push_proto::{
    device::{CallOutcome, CallOutcomeResult, NetworkChange, client_frame, push},
    sender::{DeliveryState, EscalationStep, PlaceCallRequest, RotateCaRequest, Target, target},
};
use push_server::client::DeviceClient;
use serde_json::{Value, json};
use testkit::harness::*;

/// Longest wait for the page to reach a state.
const PAGE_WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn login_roles_and_csrf() {
    let h = Harness::start().await;
    h.issue("phone-1", &[]).await;
    let reader = h.create_key("ward-screen", &["read"], &[]).await.api_key;
    let sender = h.create_key("nurse-call", &["send"], &[]).await.api_key;
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
    assert!(body.contains("\"node\":\"test-node\""), "{body}");
    let (status, _, body) = h.https("GET", "/api/devices", &[("cookie", &cookie)], "").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"device_id\":\"phone-1\""), "{body}");
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

#[tokio::test]
async fn device_list_is_paged_sorted_and_compressed() {
    let h = Harness::start().await;
    for id in ["bed-1", "bed-2", "bed-3", "station"] {
        h.issue(id, &["ward:4B"]).await;
    }
    let _online = h.device("bed-2").await;
    let (status, page) = get_json(&h, "/api/devices?q=BED&sort=state&limit=2").await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<&str> = page["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["bed-2", "bed-1"], "online first, then by id: {page}");
    assert_eq!(
        (
            &page["matched"],
            &page["counts"]["total"],
            &page["counts"]["online"]
        ),
        (&json!(3), &json!(4), &json!(1))
    );
    let (_, page) = get_json(&h, "/api/devices?desc=true&offset=1&limit=1").await;
    assert_eq!(page["rows"][0]["device_id"], "bed-3", "{page}");
    for (query, says) in [
        ("sort=nope", "sort"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("offset=-1", "offset"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = get_json(&h, &format!("/api/devices?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"].as_str().unwrap().contains(says), "{query}: {body}");
    }
    // JSON is gzipped for a client that accepts it.
    let auth = format!("Bearer {}", h.admin_key());
    let (_, head, _) = h
        .https(
            "GET",
            "/api/devices",
            &[("authorization", &auth), ("accept-encoding", "gzip")],
            "",
        )
        .await;
    assert!(
        head.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{head}"
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
async fn a_phone_that_said_its_path_was_failing_left_the_wifi_and_is_not_flagged_silent() {
    let h = Harness::start_with(|c| {
        c.heartbeat_interval_ms = 200;
        c.heartbeat_timeout_ms = 300;
    })
    .await;
    let mut presence = h.presence().await;
    let path = |lost| {
        client_frame::Kind::NetworkChange(NetworkChange {
            ssid: "Ward 4B".into(),
            path_lost: lost,
        })
    };
    // Walking out: iOS said the Wi-Fi was going, then the connection went silent.
    let mut faded = h.device("faded").await;
    // A flap: the path failed and came back; the silence after it is on the SSID.
    let mut flapper = h.device("flapper").await;
    for (phone, reports) in [(&mut faded, vec![true]), (&mut flapper, vec![true, false])] {
        phone.auto_heartbeat = false;
        for lost in reports {
            phone.send(path(lost)).await.unwrap();
        }
    }
    let mut silent = Vec::new();
    within(async {
        while silent.len() < 2 {
            let e = presence.message().await.unwrap().unwrap();
            if !e.online && e.reason == "heartbeat timeout" {
                silent.push(e.device_id);
            }
        }
    })
    .await;
    let (_, page) = get_json(&h, "/api/devices").await;
    let row = |id: &str| {
        page["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["device_id"] == id)
            .unwrap_or_else(|| panic!("{id} in {page}"))
            .clone()
    };
    let (faded, flapper) = (row("faded"), row("flapper"));
    assert_eq!(
        (&faded["left_wifi"], &faded["flags"]),
        (&json!(true), &json!([])),
        "{faded}"
    );
    assert_eq!(
        (&flapper["left_wifi"], &flapper["flags"]),
        (&json!(false), &json!(["heartbeat_silent"])),
        "{flapper}"
    );
    // The record keeps the SSID: a failing path is no move to another site.
    assert_eq!(faded["ssid"], "Ward 4B");
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
    h.place(PlaceCallRequest {
        call_id: "code-blue".into(),
        target: Some(to_devices(&["nurse-a", "nurse-b"])),
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

/// Headless Chromium driven by a chromedriver of its own on a free port.
struct Browser {
    client: Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        let chromium = require("chromium");
        let chromedriver = require("chromedriver");
        // chromedriver on a free port, ready once it accepts connections.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new(&chromedriver)
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
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a chromium session");
        Self {
            client,
            driver,
            _profile: profile,
        }
    }

    async fn close(mut self) {
        self.client.close().await.unwrap();
        let _ = self.driver.kill().await;
    }
}

/// Open the dashboard and log in with the admin key; returns the dashboard's base URL.
async fn log_in(c: &Client, h: &Harness) -> String {
    let base = format!("https://localhost:{}/", h.http_addr().port());
    c.goto(&base).await.unwrap();
    wait_until(c, "the login form", "!document.querySelector('#login').hidden").await;
    c.find(Locator::Css("#api-key"))
        .await
        .unwrap()
        .send_keys(&h.admin_key())
        .await
        .unwrap();
    click(c, "#login-form button").await;
    base
}

/// Click the element `css` selects.
async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css)).await.unwrap().click().await.unwrap();
}

/// Set the input `css` selects to `value`, as typing it does.
async fn set_input(c: &Client, css: &str, value: &str) {
    let script = "const e = document.querySelector(arguments[0]); e.value = arguments[1]; e.dispatchEvent(new Event('input'));";
    c.execute(script, vec![json!(css), json!(value)]).await.unwrap();
}

/// Wait until the device table's first row is `device`.
async fn wait_first_row(c: &Client, what: &str, device: &str) {
    let script = format!("document.querySelector('#devices tbody tr')?.dataset.device === '{device}'");
    wait_until(c, what, &script).await;
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
    let h = Harness::start().await;
    let mut bed12 = connect_on(&h, "phone-bed12", "Ward 4B", "lpush-sdk/0.3.1").await;
    let _station = connect_on(&h, "phone-station", "Ward 4B", "lpush-sdk/0.3.1").await;
    let _icu = connect_on(&h, "phone-icu-1", "ICU", "lpush-sdk/0.3.0").await;
    h.issue("phone-spare", &["ward:4B"]).await;

    let browser = Browser::start().await;
    let c = &browser.client;
    let base = log_in(c, &h).await;
    wait_until(c, "phone-bed12 online", &row_state("phone-bed12", "online")).await;
    wait_until(
        c,
        "the live stream",
        "document.querySelector('#live').classList.contains('on')",
    )
    .await;
    wait_until(c, "phone-spare offline", &row_state("phone-spare", "offline")).await;

    // A device connects after the page loaded: its row turns online without a reload.
    let spare = connect_on(&h, "phone-spare", "ICU", "lpush-sdk/0.3.1").await;
    wait_until(
        c,
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
    h.place(PlaceCallRequest {
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
        c,
        "bed 12's last call path",
        "document.querySelector('tr[data-device=\"phone-bed12\"]')?.innerText.includes('local (acked)')",
    )
    .await;

    // A device drops: its row turns offline with the reason, without a reload.
    spare.close().await.unwrap();
    wait_until(
        c,
        "phone-spare offline (live)",
        &row_state("phone-spare", "offline"),
    )
    .await;
    wait_until(
        c,
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
        c,
        "the ICU site with both its devices",
        "document.querySelector('#sites tbody').innerText.includes('1 / 2')",
    )
    .await;
    wait_until(
        c,
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
        c,
        "bed 12's call ringing",
        "document.querySelector('#calls-live tr[data-call=\"call-bed12\"] .chip[data-device=\"phone-bed12\"]')?.innerText === 'phone-bed12 ringing · local'",
    )
    .await;
    let reply = within(bed12.report_call("call-bed12", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(reply.result(), CallOutcomeResult::Recorded, "{reply:?}");
    wait_until(
        c,
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
        c,
        "the call's page naming who answered",
        "document.querySelector('#call-facts [data-fact=\"Answered by\"]')?.innerText.includes('phone-bed12')",
    )
    .await;

    // The device page: its session history, deliveries and calls.
    c.goto(&format!("{base}#device/phone-bed12")).await.unwrap();
    wait_until(
        c,
        "bed 12's call history",
        "document.querySelector('#detail-calls tr[data-call=\"call-bed12\"]')?.innerText.includes('answered · local')",
    )
    .await;
    wait_until(
        c,
        "bed 12's deliveries",
        "document.querySelector('#detail-deliveries tbody')?.innerText.includes('call-bed12')",
    )
    .await;
    wait_until(
        c,
        "bed 12's sessions",
        "document.querySelector('#detail-sessions tbody')?.rows.length >= 1",
    )
    .await;
    wait_until(
        c,
        "the revoke button for admins",
        "!document.querySelector('#revoke').hidden",
    )
    .await;

    browser.close().await;
}

/// Devices registered for the benchmark, in wards of `DEVICES / WARDS`.
const DEVICES: usize = 10_000;
const WARDS: usize = 20;
/// Phones of ward 0 online from the start (of its 500).
const WARD_ONLINE: usize = 200;
/// Phones of the other wards that connect at once.
const CONNECTING: usize = 1_000;
/// The phone whose extension keeps restarting (flagged `instance_churn`).
const CHURNING: usize = DEVICES - 1;

fn bench_id(i: usize) -> String {
    format!("dev-{i:05}")
}

fn ward(i: usize) -> usize {
    i % WARDS
}

/// Write `DEVICES` registered devices (offline, each last seen on its ward's SSID) into the
/// store at `data_dir` before the server opens it.
fn preload_devices(data_dir: &std::path::Path) {
    use push_server::store::{DeviceRecord, Op, RedbStore, Store};
    std::fs::create_dir_all(data_dir).unwrap();
    let path = data_dir.join("push.redb");
    let now = push_server::hub::now_ms();
    let ops = (0..DEVICES)
        .map(|i| {
            Op::PutDevice(DeviceRecord {
                device_id: bench_id(i),
                groups: vec![format!("ward:{:02}", ward(i))],
                created_at_ms: now - 86_400_000,
                credential_generation: 0,
                revoked: false,
                last_seen_ms: now - 60_000 - i as i64 * 1000,
                last_ssid: format!("Ward {:02}", ward(i)),
                last_disconnect_reason: "device goodbye: GOODBYE_REASON_CLIENT_STOPPING".into(),
                sdk_version: "lpush-sdk/0.3.1".into(),
                voip_token: String::new(),
                voip_token_invalid: false,
                ca_generation: 0,
            })
        })
        .collect();
    // On a thread of its own: the store's answer is awaited blocking, outside the runtime.
    std::thread::scope(|s| {
        s.spawn(|| {
            let store = RedbStore::open(&path).unwrap();
            store.submit(ops).blocking_recv().unwrap().unwrap();
            store.close();
        });
    });
}

/// Connect bench device `i` (on its ward's SSID, as extension instance `instance`) in a task
/// that acknowledges every push until aborted; reports on `up` once connected.
fn spawn_phone(
    h: &Harness,
    i: usize,
    instance: &str,
    up: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
) -> tokio::task::JoinHandle<()> {
    let id = bench_id(i);
    let (credential, _) = h.authority().issue(&id, 0, 3600);
    let mut opts = h.options(&credential, 0);
    opts.hello.ssid = format!("Ward {:02}", ward(i));
    opts.hello.instance_id = instance.into();
    tokio::spawn(async move {
        let mut phone = match DeviceClient::connect(opts).await {
            Ok(phone) => phone,
            Err(e) => {
                let _ = up.send(Err(format!("{id}: {e}")));
                return;
            }
        };
        let _ = up.send(Ok(()));
        while let Ok(p) = phone.next_push().await {
            if phone.ack(&[p.seq]).await.is_err() {
                return;
            }
        }
    })
}

/// Connect the phones `ids` at once; returns their tasks once every one is connected.
async fn connect_all(h: &Harness, ids: &[usize]) -> Vec<tokio::task::JoinHandle<()>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks: Vec<_> = ids
        .iter()
        .map(|&i| spawn_phone(h, i, &format!("inst-{i}"), tx.clone()))
        .collect();
    tokio::time::timeout(Duration::from_secs(60), async {
        for _ in ids {
            rx.recv().await.unwrap().expect("phone connects");
        }
    })
    .await
    .expect("every phone connected within 60 s");
    tasks
}

/// Follow a push's receipts until `acked` devices acknowledged it and `expired` saw it expire.
async fn await_outcomes(h: &Harness, id: &str, acked: usize, expired: usize) {
    let mut stream = h.watch(id).await;
    let mut states = std::collections::HashMap::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(u) = stream.message().await.unwrap() {
            states.insert(u.device_id.clone(), u.state());
            let count = |s| states.values().filter(|v| **v == s).count();
            if count(DeliveryState::Acked) >= acked && count(DeliveryState::Expired) >= expired {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id}: {acked} acked and {expired} expired within 30 s"));
}

/// Watches the page's main thread (long tasks, over 50 ms) and what it receives (resource
/// transfer sizes, live-stream event bytes).
const PROBE: &str = r#"
performance.setResourceTimingBufferSize(100000);
window.lpushProbe = { long: [], bytes: 0 };
new PerformanceObserver((l) => { for (const e of l.getEntries()) lpushProbe.long.push(e.duration); }).observe({ type: "longtask" });
new PerformanceObserver((l) => { for (const e of l.getEntries()) lpushProbe.bytes += e.transferSize; }).observe({ type: "resource" });
source.addEventListener("changed", (e) => { lpushProbe.bytes += e.data.length + 24; });
"#;

/// What the probe saw since the last reading: `(longest task ms, tasks over 50 ms, bytes)`.
async fn probe_reading(c: &Client) -> (f64, u64, f64) {
    let v = c
        .execute(
            "const p = lpushProbe, r = [Math.max(0, ...p.long), p.long.length, p.bytes]; p.long = []; p.bytes = 0; return r;",
            vec![],
        )
        .await
        .unwrap();
    (
        v[0].as_f64().unwrap(),
        v[1].as_u64().unwrap(),
        v[2].as_f64().unwrap(),
    )
}

/// Let the page finish what the last events asked for (its live refreshes are at most a
/// second apart), then read the probe.
async fn settle_then_read(c: &Client, what: &str) -> (f64, u64, f64) {
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (longest, count, bytes) = probe_reading(c).await;
    println!(
        "dashboard bench: {what}: longest main-thread task {longest:.0} ms ({count} over 50 ms), {:.0} KB received",
        bytes / 1000.0
    );
    (longest, count, bytes)
}

/// The ids of the rows the device table shows, in order.
async fn shown_rows(c: &Client) -> Vec<String> {
    let v = c
        .execute(
            "return [...document.querySelectorAll('#devices tbody tr[data-device]')].map((r) => r.dataset.device + ' ' + r.dataset.state + ' ' + r.dataset.problem);",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

/// The dashboard at a site's size: 10,000 registered devices, 200 online, then a ward-wide
/// message, its expiry and 1,000 phones connecting at once, in headless Chromium. Asserts what
/// the page shows (rows, order, filters, search, paging, the device page over the list) and
/// prints the timings, which it never fails on (figures in BENCHMARKS.md):
/// `cargo test -p push-server --test dashboard dashboard_at_10000_devices -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_at_10000_devices() {
    let h = Harness::start_with(|cfg| {
        preload_devices(&cfg.data_dir);
        cfg.limits.device_handshakes = OPEN_HANDSHAKES;
        cfg.limits.http_handshakes = OPEN_HANDSHAKES;
        cfg.limits.diag_instance_churn_max = 2;
    })
    .await;
    let ward0: Vec<usize> = (0..DEVICES).filter(|i| ward(*i) == 0).take(WARD_ONLINE).collect();
    let mut phones = connect_all(&h, &ward0).await;

    let browser = Browser::start().await;
    let c = &browser.client;
    let base = log_in(c, &h).await;
    wait_until(
        c,
        "the first page",
        "document.querySelectorAll('#devices tbody tr[data-device]').length === 50",
    )
    .await;
    // By id: ward 0's phones among them online, the others offline (no phone of their wards
    // is online, so they are not missed).
    let first_page: Vec<String> = (0..50)
        .map(|i| {
            format!(
                "{} {} ",
                bench_id(i),
                if ward0.contains(&i) { "online" } else { "offline" }
            )
        })
        .collect();
    assert_eq!(shown_rows(c).await, first_page);
    wait_until(
        c,
        "the page's totals",
        "document.querySelector('#page-info').innerText === '1–50 of 10000 devices'",
    )
    .await;

    // First paint of the device list on a fresh load (logged in), three times.
    let mut paints = Vec::new();
    for _ in 0..3 {
        c.goto(&base).await.unwrap();
        wait_until(
            c,
            "the device list painted",
            "performance.getEntriesByName('lpush:devices-painted').length > 0",
        )
        .await;
        let at = c
            .execute(
                "return performance.getEntriesByName('lpush:devices-painted')[0].startTime;",
                vec![],
            )
            .await
            .unwrap();
        paints.push(at.as_f64().unwrap());
    }
    println!("dashboard bench: first paint of the device list (ms after navigation): {paints:.0?}");
    wait_until(
        c,
        "the live stream",
        "document.querySelector('#live').classList.contains('on')",
    )
    .await;
    c.execute(PROBE, vec![]).await.unwrap();
    // The probe sees a task of the page that blocks it for 120 ms.
    c.execute(
        "setTimeout(() => { const t = performance.now(); while (performance.now() - t < 120); }, 0);",
        vec![],
    )
    .await
    .unwrap();
    wait_until(
        c,
        "the probe seeing a long task",
        "lpushProbe.long.some((d) => d >= 100)",
    )
    .await;

    // Online first: the rows that the ward's events change are on screen.
    click(c, "#devices th[data-sort='state']").await;
    wait_until(
        c,
        "online devices first",
        "document.querySelector('#devices tbody tr')?.dataset.state === 'online'",
    )
    .await;
    probe_reading(c).await;

    // A ward-wide message: 200 phones acknowledge it, 300 are offline and it expires for them.
    let sent = h
        .send_req(push_proto::sender::SendMessageRequest {
            target: Some(Target {
                kind: Some(target::Kind::Group("ward:00".into())),
            }),
            body: "Ward round in 5 minutes".into(),
            ttl_seconds: 8,
            ..Default::default()
        })
        .await;
    await_outcomes(&h, &sent.message_id, WARD_ONLINE, 0).await;
    settle_then_read(c, "ward-wide message (500 phones, 200 online)").await;
    await_outcomes(&h, &sent.message_id, WARD_ONLINE, DEVICES / WARDS - WARD_ONLINE).await;
    settle_then_read(c, "its expiry (300 phones)").await;

    // An extension that keeps restarting: four instances in a row.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for n in 0..4 {
        let task = spawn_phone(&h, CHURNING, &format!("restart-{n}"), tx.clone());
        within(rx.recv())
            .await
            .unwrap()
            .expect("the churning phone connects");
        phones.push(task);
    }

    // 1,000 phones of the other wards connect at once.
    let others: Vec<usize> = (0..CHURNING).filter(|i| ward(*i) != 0).take(CONNECTING).collect();
    probe_reading(c).await;
    phones.extend(connect_all(&h, &others).await);
    settle_then_read(c, "1,000 phones connecting at once").await;
    let online = WARD_ONLINE + CONNECTING + 1;
    wait_until(
        c,
        "every phone online in the counter",
        &format!("document.querySelector('#stat-online').innerText === '{online}'"),
    )
    .await;
    assert!(
        shown_rows(c).await.iter().all(|r| r.contains(" online ")),
        "online first"
    );

    // Steady traffic: a message every 250 ms to an online phone, for 10 s.
    probe_reading(c).await;
    let started = std::time::Instant::now();
    for n in 0..40 {
        let to_phone = bench_id(others[n * 17 % others.len()]);
        h.send(&to_phone, "Bed 7 asks for you").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, _, bytes) = probe_reading(c).await;
    let per_sec = bytes / started.elapsed().as_secs_f64();
    println!(
        "dashboard bench: steady traffic per tab (4 messages/s, {online} online, online-first view): {:.1} KB/s",
        per_sec / 1000.0
    );

    // Search: typed one key every 20 ms; the time from the last key to the one row.
    let searched = c
        .execute_async(
            r##"const done = arguments[arguments.length - 1], text = "dev-04321";
            const input = document.querySelector("#search"), body = document.querySelector("#devices tbody");
            let last = 0;
            new MutationObserver((_, obs) => {
              const rows = body.querySelectorAll("tr[data-device]");
              if (last && rows.length === 1 && rows[0].dataset.device === text) { obs.disconnect(); done(performance.now() - last); }
            }).observe(body, { childList: true });
            [...text].forEach((_, i) => setTimeout(() => {
              input.value = text.slice(0, i + 1); input.dispatchEvent(new Event("input"));
              if (i === text.length - 1) last = performance.now();
            }, 20 * i));"##,
            vec![],
        )
        .await
        .unwrap();
    let request = c
        .execute("const r = performance.getEntriesByType('resource').filter((e) => e.name.includes('q=dev-04321')).pop(); return r ? r.responseEnd - r.startTime : null;", vec![])
        .await
        .unwrap();
    println!(
        "dashboard bench: search narrowing to one device: {:.0} ms after the last key (its request {:.0} ms)",
        searched.as_f64().unwrap(),
        request.as_f64().unwrap_or(f64::NAN)
    );
    wait_until(
        c,
        "the search's totals",
        "document.querySelector('#page-info').innerText === '1–1 of 1 matching (10000 devices)'",
    )
    .await;

    // Filters and the problems first, from the server's filtering and sorting.
    set_input(c, "#search", "").await;
    set_input(c, "#filter-state", "online").await;
    wait_until(
        c,
        "only the online devices",
        &format!(
            "document.querySelector('#page-info').innerText === '1–50 of {online} matching (10000 devices)'"
        ),
    )
    .await;
    set_input(c, "#filter-state", "").await;
    click(c, "#problems-first").await;
    wait_first_row(c, "the churning phone first", &bench_id(CHURNING)).await;
    let rows = shown_rows(c).await;
    assert_eq!(rows[0], format!("{} online instance_churn", bench_id(CHURNING)));
    // Then the phones offline while their SSID has phones online (every ward's now), by id.
    let missing = (0..DEVICES)
        .find(|i| !ward0.contains(i) && !others.contains(i))
        .unwrap();
    assert_eq!(
        rows[1],
        format!("{} offline offline_expected", bench_id(missing)),
        "{rows:?}"
    );
    assert!(
        rows[1..].iter().all(|r| r.ends_with(" offline offline_expected")),
        "{rows:?}"
    );

    // Paging, and the device page over the list: closing it leaves the list where it was.
    click(c, "#devices th[data-sort='device']").await;
    wait_first_row(c, "sorted by device", "dev-00000").await;
    click(c, "#page-next").await;
    wait_first_row(c, "the second page", "dev-00050").await;
    click(c, "tr[data-device='dev-00060'] a").await;
    wait_until(c, "the device page", "!document.querySelector('#detail').hidden && document.querySelector('#detail-id').innerText === 'dev-00060'").await;
    c.execute("window.lpushScroll = window.scrollY;", vec![])
        .await
        .unwrap();
    click(c, "#detail-close").await;
    wait_until(c, "the list where it was", "document.querySelector('#detail').hidden && !document.querySelector('#list').hidden && document.querySelector('#devices tbody tr')?.dataset.device === 'dev-00050' && window.scrollY === window.lpushScroll && window.lpushScroll > 0").await;

    for phone in phones {
        phone.abort();
    }
    browser.close().await;
}
