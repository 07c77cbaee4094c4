//! The configuration file (`serve --config push.toml`): TOML text into `Config` over the
//! defaults, then `validate`, exactly as `Config::from_file` and the server do. A file with an
//! unknown key or a bad value must be refused with a message, never a panic; the message is
//! formatted too, since the operator reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use push_server::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match toml::from_str::<Config>(text) {
        Ok(cfg) => {
            if cfg.validate().is_ok() {
                // What the server derives from a valid configuration.
                let _ = (cfg.heartbeat_interval(), cfg.heartbeat_timeout());
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
