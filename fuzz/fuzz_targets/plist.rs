//! The provider's configuration as iOS hands it (`ProviderConfiguration::from_plist_bytes`, XML
//! or binary property lists of any content).
//!
//! Beyond "never panics": a configuration that parses survives `to_plist` and a binary
//! property-list round trip unchanged (iOS stores the manager's dictionary and hands it back),
//! and yields an SDK configuration for any persisted sequence. (The XML form is checked where it
//! is produced, by the enrollment target: XML cannot carry every string a binary plist can.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use nepush_provider::config::ProviderConfiguration;

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = ProviderConfiguration::from_plist_bytes(data) else {
        return;
    };
    let dict = cfg.to_plist();
    assert_eq!(
        ProviderConfiguration::from_plist(&dict).as_ref(),
        Ok(&cfg),
        "to_plist round trip"
    );
    let mut xml = Vec::new();
    plist::to_writer_xml(&mut xml, &plist::Value::Dictionary(dict)).expect("a dictionary of strings writes");
    assert_eq!(
        ProviderConfiguration::from_plist_bytes(&xml).as_ref(),
        Ok(&cfg),
        "XML round trip"
    );
    let _ = cfg.client_config(nepush_provider::LastSeen {
        epoch: u64::MAX,
        seq: u64::MAX,
    });
});
