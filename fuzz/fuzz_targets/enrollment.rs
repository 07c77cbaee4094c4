//! The body of `POST /v1/enroll`, parsed as the HTTPS handler parses it (serde_json into
//! `EnrollForm`), then enrolled by the real `Enroller` over a real hub and store.
//!
//! Beyond "never panics": an accepted enrollment's property list is one the provider
//! (`nepush-provider`) parses, for the same device and credential (the crate invariant "its
//! plist keys are the ones nepush-provider parses", for any device id or group a caller sends).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use lpush_fuzz::{admin_in, hub_in, runtime, scratch_dir};
use nepush_provider::config::ProviderConfiguration;
use push_server::{
    api::{
        enrollment::{Caller, EnrollForm, Enroller, SiteProfile},
        keys::Holder,
    },
    auth::DeviceAuthority,
    config::{Config, Limits},
    pki,
};

struct World {
    rt: tokio::runtime::Runtime,
    enroller: Enroller,
    admin: Holder,
    _dir: tempfile::TempDir,
}

/// One hub, key and PKI for the process: making a CA per input would dominate the run, and an
/// admin enrollment does not depend on earlier ones.
fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = scratch_dir();
        let rt = runtime();
        let (hub, store) = {
            let _enter = rt.enter();
            hub_in(dir.path(), Limits::default())
        };
        let admin = admin_in(&rt, store);
        let auth = DeviceAuthority::load_or_create(dir.path()).expect("device key");
        let names = vec!["push.ward.local".to_string()];
        let (pki, _) = pki::load_or_create(&dir.path().join("tls"), &names).expect("pki");
        let mut cfg = Config {
            server_names: names,
            ..Config::default()
        };
        cfg.site.ssids = vec!["Ward 4B".into(), "Station Ünfall".into()];
        let site = SiteProfile::new(&cfg, "0.0.0.0:7443".parse().unwrap(), &pki);
        World {
            enroller: Enroller::new(hub, Arc::new(auth), site),
            admin,
            rt,
            _dir: dir,
        }
    })
}

fuzz_target!(|body: &[u8]| {
    let Ok(form) = serde_json::from_slice::<EnrollForm>(body) else {
        return;
    };
    let w = world();
    let device_id = form.device_id.clone();
    let Ok(enrollment) = w.rt.block_on(w.enroller.enroll(
        form.into(),
        Caller {
            key: &w.admin,
            source: None,
            via: "https",
        },
    )) else {
        return;
    };
    let root =
        plist::Value::from_reader_xml(enrollment.plist.as_bytes()).expect("the enrollment plist parses");
    let provider = root
        .as_dictionary()
        .and_then(|d| d.get("providerConfiguration"))
        .and_then(plist::Value::as_dictionary)
        .expect("providerConfiguration is a dictionary");
    let cfg = ProviderConfiguration::from_plist(provider).expect("the provider reads its enrollment");
    assert_eq!(cfg.device_id, device_id);
    let expected = enrollment
        .provider_configuration
        .expect("enrollments carry a configuration");
    assert_eq!(cfg.credential, expected.credential);
    assert_eq!(cfg.match_ssids, expected.match_ssids);
});
