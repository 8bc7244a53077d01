//! net-conf.json: Go-JSON decoding and Flannel's checks never panic; a config that parses
//! renders and re-parses.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = twill_formats::net_conf::NetConfig::parse_and_check(text) {
        let _ = cfg.backend_type();
        let _ = cfg.vxlan();
    }
    let _ = twill_formats::net_conf::NetConfig::parse(text);
});
