//! NFLOG packet messages as the kernel sends them to `twill-policy drops`: the attribute
//! parser, the IPv4/IPv6 header parser and the description with pods never panic, whatever
//! the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use twill_nft::nflog::{parse_ip, parse_packet};
use twill_policy::drops::describe;
use twill_policy::status::Endpoints;

fuzz_target!(|data: &[u8]| {
    // The bytes as a whole message body, and as a logged packet's payload.
    let _ = parse_ip(data);
    if let Ok(packet) = parse_packet(data) {
        let _ = parse_ip(&packet.payload);
        if let Some(d) = describe(&packet, &Endpoints::default()) {
            let _ = d.text();
        }
    }
});
