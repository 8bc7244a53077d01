//! The CNI config twill ships (`deploy/cni/10-flannel.conflist`, which `deploy/`'s manifest test
//! holds equal to the ConfigMap's `cni-conf.json`) passes this plugin's own parser and delegate
//! checks, as a runtime would hand it over: the list's name and version injected into the entry.

use serde_json::Value;
use twill_cni::netconf::FlannelConf;

#[test]
fn shipped_conflist_entry_passes_the_plugins_parser() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cni/10-flannel.conflist"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let list: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut plugin = list["plugins"][0].clone();
    assert_eq!(plugin["type"], "flannel", "{path}: first plugin");
    plugin["name"] = list["name"].clone();
    plugin["cniVersion"] = list["cniVersion"].clone();
    let conf = FlannelConf::parse(plugin.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{path}: flannel entry rejected: {}", e.msg));
    conf.validate_delegate()
        .unwrap_or_else(|e| panic!("{path}: delegate rejected: {}", e.msg));
    assert_eq!(conf.name, "cbr0");
    assert_eq!(conf.cni_version, "0.3.1");
}
