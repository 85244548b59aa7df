//! The agent's TOML configuration parser (`ctoffload_agent::config::parse`: syntax,
//! deserialization, then validation) on arbitrary UTF-8 text. Checks: no panic, and an
//! error always names a line or a key only when the text has one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ctoffload_agent::config::parse(text) {
        Ok(cfg) => {
            // A valid configuration also parses without validation.
            assert!(ctoffload_agent::config::parse_file(text).is_ok(), "{cfg:?}");
        }
        Err(e) => {
            let _ = e.key();
            let _ = e.to_string();
        }
    }
});
