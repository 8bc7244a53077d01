//! NetworkPolicy manifests (YAML, the manifests-directory source): parsing, then compiling the
//! snapshot for every node it mentions, rendering the full nft script and the incremental
//! transactions between the nodes' tables (and from an empty table), never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use twill_policy::compile::{compile, Options};
use twill_policy::model::Snapshot;
use twill_policy::source::manifests::parse_str;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Objects that cannot be read break their namespace; the rest compiles.
    let snap = parse_str(text, "fuzz.yaml");
    let mut nodes: Vec<String> = snap.pods.iter().filter_map(|p| p.node.clone()).collect();
    nodes.push("n1".into());
    nodes.dedup();
    let mut prev = compile(&Snapshot::default(), "n1", &Options::default()).table_def();
    for node in nodes.iter().take(4) {
        let def = compile(&snap, node, &Options::default()).table_def();
        let _ = def.render();
        let _ = def.diff(&prev);
        let _ = prev.diff(&def);
        prev = def;
    }
});
