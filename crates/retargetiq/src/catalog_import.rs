//! `retargetiq catalog import FILE`: a shop's products, one JSON object per line
//! (`{"productId", "name", "category", "price", "brand"?, "available"?, "popularity"?}`), sent
//! to `PUT /api/catalog/products` in batches, with progress and a summary.
//!
//! Each line is checked with the API's own rules first, so a bad line is reported with its
//! line number and skipped while the rest goes in. A batch the service cannot store right now
//! (`503`) is sent again after a pause: products are upserts keyed by id, so a retry is safe.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use evaluation::import::send;
use serde_json::Value;

/// Most line errors the summary lists.
const ERRORS_LISTED: usize = 10;

#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// JSON lines, one product per line (blank lines are skipped).
    pub file: PathBuf,
    /// The user-activity service, which serves the catalog API.
    #[arg(long, env = "USER_ACTIVITY_URL", default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// Products per request (at most 1,000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch: u16,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Summary {
    pub lines: usize,
    pub accepted: usize,
    /// (line number, reason) of the lines that were not sent.
    pub rejected: Vec<(u64, String)>,
    pub elapsed: Duration,
}

impl Summary {
    pub fn report(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-3);
        let mut out = format!(
            "catalog import: {} lines, {} products accepted, {} lines rejected, in {:.1} s ({:.0} products/s)",
            self.lines,
            self.accepted,
            self.rejected.len(),
            secs,
            self.accepted as f64 / secs
        );
        for (line, reason) in self.rejected.iter().take(ERRORS_LISTED) {
            out.push_str(&format!("\n  line {line}: {reason}"));
        }
        if self.rejected.len() > ERRORS_LISTED {
            out.push_str(&format!("\n  ... and {} more", self.rejected.len() - ERRORS_LISTED));
        }
        out
    }
}

/// Reads `args.file` and sends its products.
pub async fn run(args: &ImportArgs) -> anyhow::Result<Summary> {
    let lines = evaluation::history::numbered_lines(&args.file)?;
    let endpoint = format!("{}/api/catalog/products", args.url.trim_end_matches('/'));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut batch: Vec<Value> = Vec::with_capacity(usize::from(args.batch));
    let mut progress = evaluation::progress::Ticker::default();
    for line in lines {
        let (number, line) = line?;
        summary.lines += 1;
        let checked = kit::json::value_from_bytes(line.as_bytes())
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|v| events::validate::catalog_product(&v, Utc::now()).map(|_| v).map_err(|e| e.to_string()));
        match checked {
            Ok(v) => batch.push(v),
            Err(reason) => summary.rejected.push((number, reason)),
        }
        if batch.len() == usize::from(args.batch) {
            summary.accepted += send(&http, reqwest::Method::PUT, &endpoint, &batch).await?;
            batch.clear();
        }
        if progress.due() {
            eprintln!("catalog import: {} lines read, {} products accepted", summary.lines, summary.accepted);
        }
    }
    if !batch.is_empty() {
        summary.accepted += send(&http, reqwest::Method::PUT, &endpoint, &batch).await?;
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}
