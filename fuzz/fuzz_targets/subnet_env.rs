//! subnet.env: the one parser (twilld and twill-cni) never panics, and what it accepts renders
//! to a file it parses back to the same values.
#![no_main]
use libfuzzer_sys::fuzz_target;
use twill_formats::subnet_env::SubnetEnv;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(env) = SubnetEnv::parse(text) {
        let _ = env.subnet_network();
        let _ = env.ipv6_subnet_network();
        let _ = env.missing();
        let rendered = env.render();
        let again = SubnetEnv::parse(&rendered).expect("rendered subnet.env parses");
        assert_eq!(again.render(), rendered);
    }
});
