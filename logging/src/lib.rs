//! The one logging setup of twill's three programs (twilld, twill-policy and the CNI plugin):
//! a tracing subscriber with an env filter that writes either human-readable text or JSON
//! lines. The daemons write to stderr; the CNI plugin writes to a file, since its stderr and
//! stdout belong to the container runtime.
//!
//! A JSON line carries `timestamp`, `level`, `target`, `message` and the event's own fields at
//! the top level (no nesting), so the field names the programs share (`node`, `peer`,
//! `subnet`, `pod`, `policy`) are top-level keys a log pipeline can index directly.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
pub use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// tracing-subscriber's human-readable line (what the programs wrote before JSON existed).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A log format name other than `text` or `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format {0:?} (expected \"text\" or \"json\")")]
pub struct UnknownLogFormat(pub String);

impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<LogFormat, UnknownLogFormat> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(UnknownLogFormat(other.to_string())),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// The filter from the environment variable `var` (tracing's directive syntax, e.g.
/// `info,twill=debug`) when it is set and valid, else `default` (e.g. "info").
pub fn env_filter(var: &str, default: &str) -> EnvFilter {
    EnvFilter::try_from_env(var).unwrap_or_else(|_| EnvFilter::new(default))
}

/// A subscriber writing `format` lines that pass `filter` to `writer`. `ansi` colours text
/// lines (only for a terminal; never for files or JSON).
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                // twill's programs open no spans; leaving span objects out keeps every line
                // flat, one level of keys.
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// The process-wide subscriber was already set (a second `init`).
#[derive(Debug, thiserror::Error)]
#[error("a global tracing subscriber is already installed")]
pub struct AlreadyInitialized;

/// Installs the process-wide subscriber writing to stderr (the daemons). Text is coloured
/// only when stderr is a terminal.
pub fn init_stderr(format: LogFormat, filter: EnvFilter) -> Result<(), AlreadyInitialized> {
    let ansi = std::io::stderr().is_terminal();
    tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr, ansi))
        .map_err(|_| AlreadyInitialized)
}

/// Installs the process-wide subscriber writing to `writer` (the CNI plugin's log file),
/// uncoloured.
pub fn init_writer<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
) -> Result<(), AlreadyInitialized>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing::subscriber::set_global_default(subscriber(format, filter, writer, false))
        .map_err(|_| AlreadyInitialized)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects everything written, for reading the lines back.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn capture(format: LogFormat, filter: &str, emit: impl FnOnce()) -> String {
        let buf = Buffer::default();
        let sub = subscriber(format, EnvFilter::new(filter), buf.clone(), false);
        tracing::subscriber::with_default(sub, emit);
        buf.text()
    }

    #[test]
    fn formats_parse_and_a_bad_one_is_named() {
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!(LogFormat::default(), LogFormat::Text);
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(f.to_string().parse::<LogFormat>(), Ok(f));
        }
        for bad in ["JSON", "xml", "", " json"] {
            assert_eq!(
                bad.parse::<LogFormat>().unwrap_err().to_string(),
                format!("unknown log format {bad:?} (expected \"text\" or \"json\")")
            );
        }
    }

    #[test]
    fn json_lines_carry_the_standard_keys_and_flat_fields() {
        let out = capture(LogFormat::Json, "info", || {
            tracing::info!(
                node = "node-a",
                peer = "198.18.0.3",
                subnet = "10.244.2.0/24",
                count = 3_u64,
                "peer added"
            );
            tracing::warn!(pod = "default/web", "second line");
        });
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        let first = lines[0].as_object().unwrap();
        let mut keys: Vec<&str> = first.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "count",
                "level",
                "message",
                "node",
                "peer",
                "subnet",
                "target",
                "timestamp"
            ]
        );
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "peer added");
        assert_eq!(first["node"], "node-a");
        assert_eq!(first["peer"], "198.18.0.3");
        assert_eq!(first["subnet"], "10.244.2.0/24");
        assert_eq!(first["count"], 3);
        assert_eq!(first["target"], module_path!());
        // RFC 3339 in UTC, e.g. 2026-12-03T11:24:28.123456Z.
        let ts = first["timestamp"].as_str().unwrap();
        assert!(
            ts.len() >= 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
            "{ts}"
        );
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["pod"], "default/web");
    }

    #[test]
    fn the_filter_applies_to_both_formats() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let out = capture(format, "warn", || {
                tracing::info!("dropped by the filter");
                tracing::warn!("kept");
            });
            assert!(!out.contains("dropped by the filter"), "{format}: {out}");
            assert_eq!(out.lines().count(), 1, "{format}: {out}");
            assert!(out.contains("kept"), "{format}: {out}");
        }
    }

    #[test]
    fn text_lines_are_plain_when_not_coloured() {
        let out = capture(LogFormat::Text, "info", || {
            tracing::info!(node = "node-a", "started");
        });
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(out.contains(" INFO "), "{out}");
        assert!(out.contains("started node=\"node-a\""), "{out}");
        assert!(serde_json::from_str::<serde_json::Value>(out.trim()).is_err());
    }
}
