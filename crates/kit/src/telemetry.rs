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

/// A budget of log lines per second for one call site that would otherwise write a line per
/// message: under load those lines cost more than the work they describe (formatting, a
/// `write` each, and `retargetiq up` relaying them), and fill the disk of a `docker logs`
/// at gigabytes an hour. The first `per_second` of each second are written; the rest are
/// counted, and the count is handed to the next line written, to say how many were left out.
#[derive(Debug, Clone)]
pub struct LineBudget {
    per_second: u32,
    window: Option<std::time::Instant>,
    used: u32,
    skipped: u64,
}

impl LineBudget {
    /// At most `per_second` lines a second (0: none).
    pub fn new(per_second: u32) -> Self {
        Self { per_second, window: None, used: 0, skipped: 0 }
    }

    /// Whether a line may be written at `now`: `Some(n)` when it may, `n` being how many lines
    /// were left out since the last one written; `None` when it may not (it is counted).
    pub fn admit(&mut self, now: std::time::Instant) -> Option<u64> {
        if self.window.is_none_or(|start| now.duration_since(start) >= std::time::Duration::from_secs(1)) {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            Some(std::mem::take(&mut self.skipped))
        } else {
            self.skipped += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::LineBudget;

    #[test]
    fn a_line_budget_writes_the_first_lines_of_each_second_and_counts_the_rest() {
        let start = Instant::now();
        let mut budget = LineBudget::new(3);
        let first: Vec<_> = (0..5).map(|i| budget.admit(start + Duration::from_millis(i * 100))).collect();
        assert_eq!(first, [Some(0), Some(0), Some(0), None, None]);
        // A new second: the first line written says two were left out, the next ones none.
        assert_eq!(budget.admit(start + Duration::from_millis(1_000)), Some(2));
        assert_eq!(budget.admit(start + Duration::from_millis(1_100)), Some(0));
        assert_eq!(budget.admit(start + Duration::from_millis(1_200)), Some(0));
        assert_eq!(budget.admit(start + Duration::from_millis(1_300)), None);
        // The window starts at the first line after a quiet spell, not on a fixed grid.
        assert_eq!(budget.admit(start + Duration::from_millis(5_500)), Some(1));
        assert_eq!(budget.admit(start + Duration::from_millis(6_400)), Some(0));

        let mut silent = LineBudget::new(0);
        assert_eq!(silent.admit(start), None);
        assert_eq!(silent.admit(start + Duration::from_secs(2)), None);
    }
}
