//! Structured logs: one init function; the service name is on every line (through the
//! `service` span that [`crate::service`] runs each service in), JSON when asked.

use std::io::IsTerminal as _;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Log line format (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected `text` or `json`".to_owned()),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Installs the global subscriber, writing to stdout (services). `RUST_LOG` filters (default
/// `info`, with the chatty dependencies at `warn`). Calling it twice is harmless (tests run
/// several services).
pub fn init(format: LogFormat) {
    init_to(format, false);
}

/// The same, writing to stderr: for command-line tools whose stdout is their result.
pub fn init_to_stderr(format: LogFormat) {
    init_to(format, true);
}

fn init_to(format: LogFormat, stderr: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // `tansu` covers every Tansu crate: `tansu_service` opens several INFO spans per request
        // the broker answers (one names itself with a fresh random id), a cost per message
        // consumed or produced that nothing reads.
        EnvFilter::new("info,tansu=warn,rama=warn,libsql=warn,h2=warn,hyper=warn")
    });
    // Colours only on a terminal (or when the parent, `retargetiq up`, asks for them).
    let terminal = if stderr { std::io::stderr().is_terminal() } else { std::io::stdout().is_terminal() };
    let ansi = terminal || std::env::var("CLICOLOR_FORCE").is_ok_and(|v| v == "1");
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_span_events(FmtSpan::NONE).with_ansi(ansi).with_writer(
            move || -> Box<dyn std::io::Write> {
                if stderr { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) }
            },
        );
    let result = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).with_span_list(true).try_init(),
    };
    // Already installed: keep the first one.
    drop(result);
}

/// The summed `kafka_consumer_lag` gauges of one service's Prometheus text (0 when it reports
/// none): how far its consumers are behind.
pub fn consumer_lag(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("kafka_consumer_lag"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .sum()
}
