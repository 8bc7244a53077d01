//! `twill-cni`: Flannel's CNI plugin, installed as `/opt/cni/bin/flannel`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Instant;

use twill_cni::plugin::{self, CniEnv};

fn main() -> ExitCode {
    let started = Instant::now();
    let env = CniEnv::from_process();
    let mut stdin = Vec::new();
    if env.command.as_deref().is_some_and(|c| !c.is_empty()) {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            eprintln!("twill-cni: failed to read stdin: {e}");
        }
    } else {
        eprintln!(
            "twill-cni {}: Flannel-compatible CNI plugin (CNI spec {:?})",
            env!("CARGO_PKG_VERSION"),
            twill_cni::validate::SUPPORTED_VERSIONS
        );
    }
    // The log file named in the network config (`logFile`), if any; best effort.
    twill_cni::log::start(&stdin);
    let outcome = plugin::run(&env, &stdin);
    let cni_args = std::env::var("CNI_ARGS").ok();
    twill_cni::log::command(&env, cni_args.as_deref(), &outcome, started.elapsed());
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(result) => {
            if let Some(bytes) = result {
                let _ = out.write_all(&bytes);
                let _ = out.flush();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("twill-cni: {e}");
            let _ = out.write_all(e.to_json(&plugin::error_version(&stdin)).as_bytes());
            let _ = out.flush();
            ExitCode::FAILURE
        }
    }
}
