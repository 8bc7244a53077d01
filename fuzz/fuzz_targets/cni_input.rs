//! CNI stdin and environment: every check before the plugin touches disk or the kernel, then
//! the delegate config built from a (fuzzed) subnet.env and result conversion. Input fields are
//! separated by NUL: command, containerID, netns, ifname, path, subnet.env, stdin.
#![no_main]
use libfuzzer_sys::fuzz_target;
use twill_cni::plugin::{prepare, CniEnv, Prepared};
use twill_formats::subnet_env::SubnetEnv;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(7, |b| *b == 0);
    let mut field = || {
        parts
            .next()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    };
    let env = CniEnv {
        command: field(),
        container_id: field(),
        netns: field(),
        ifname: field(),
        path: field(),
    };
    let subnet_env = field().unwrap_or_default();
    let stdin = field().unwrap_or_default();
    let Ok(Prepared::Command { conf, .. }) = prepare(&env, stdin.as_bytes()) else {
        return;
    };
    let _ = conf.validate_delegate();
    if let Ok(senv) = SubnetEnv::parse(&subnet_env) {
        if let Ok(d) = conf.delegate_config(&senv) {
            let _ = serde_json::Value::Object(d).to_string();
        }
    }
    let _ = twill_cni::netconf::convert_result(stdin.as_bytes(), &conf.cni_version);
    let _ = twill_cni::netconf::valid_attachment_ids(&conf.raw);
});
