//! twilld: the thin shell. Flags, logging, runtime; everything else is in the library.

fn main() -> std::process::ExitCode {
    single_malloc_arena();
    // `twilld status`: flanneld takes no positional arguments, so a first argument `status`
    // cannot be one of Flannel's command lines.
    if std::env::args().nth(1).as_deref() == Some("status") {
        return twill::status_command::main(std::env::args().skip(2));
    }
    let flags = twill::flags::Flags::parse_from_env_and_args();
    let format = match flags.log_format() {
        Ok(format) => format,
        Err(e) => {
            eprintln!("twilld: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let level = match flags.verbosity {
        0 => "info",
        1..=3 => "debug",
        _ => "trace",
    };
    // TWILL_LOG (tracing's directive syntax) overrides -v.
    let filter = twill_logging::env_filter("TWILL_LOG", level);
    if let Err(e) = twill_logging::init_stderr(format, filter) {
        eprintln!("twilld: {e}");
        return std::process::ExitCode::FAILURE;
    }

    if flags.cleanup {
        return match twill::cleanup::run() {
            Ok(removed) if removed.is_empty() => {
                tracing::info!("cleanup: no twill table on this node; nothing to remove");
                std::process::ExitCode::SUCCESS
            }
            Ok(removed) => {
                for table in &removed {
                    tracing::info!(table = %table, "cleanup: removed twill's table");
                }
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("cleanup: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("twilld: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(twill::daemon::run(flags)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One malloc arena for the whole process. glibc gives each thread that allocates an arena of
/// its own; twilld's threads (the runtime's workers, the blocking pool that runs nft) work on
/// one reconcile pass at a time, so further arenas only hold freed memory that `malloc_trim`
/// cannot always return. Measured at 5000 peers (`bench/convergence`): a start that programs
/// every entry in one pass settled at 27.3 MiB with glibc's default arenas, 24.5 MiB with one.
fn single_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets one of glibc's allocator tunables; it is called first thing in
    // main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
