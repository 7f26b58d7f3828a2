//! `retargetiq events import FILE [--format F] [--rate R]`: a shopping history sent through
//! the ingestion APIs in batches, with progress and a summary.
//!
//! - `platform`: JSON lines in the APIs' own shapes: activity events and orders (with their
//!   past `timestamp`s) and catalog products; each line goes to its endpoint as written.
//! - `rees46`, `taobao`: the two public datasets, mapped to the platform's event types (views,
//!   carts, favourites as clicks, purchases as orders); their products go to the catalog first.
//!
//! Events keep their ids (the datasets' get `h<n>`, their place among the file's readable lines
//! in time order), so importing the same file twice stores every event once. Lines that cannot
//! be read are reported by number and skipped.
//!
//! The file is read twice, not held: first for its products, counts and (when it is not in
//! time order) the order of its lines, then again line by line as the batches go out
//! ([`evaluation::history::scan`]). Memory holds the products, one batch and, for a file out
//! of time order, 16 bytes a line; a file that changes between the readings is refused.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use evaluation::history::{self, Format};
use evaluation::import::{self, Endpoints};
use serde_json::Value;

#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    pub file: PathBuf,
    #[arg(long, value_enum, default_value = "platform")]
    pub format: Format,
    /// Events per second at most (0: as fast as the services take them).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Events per request.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=500))]
    pub batch: u16,
    #[arg(long, env = "USER_ACTIVITY_URL", default_value = "http://127.0.0.1:8081")]
    pub user_activity_url: String,
    #[arg(long, env = "ORDER_URL", default_value = "http://127.0.0.1:8082")]
    pub order_url: String,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Summary {
    pub products: usize,
    pub activity: usize,
    pub orders: usize,
    /// Lines that could not be read.
    pub skipped: usize,
    pub elapsed: Duration,
}

impl Summary {
    pub fn report(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-3);
        format!(
            "events import: {} activity events and {} orders accepted, {} products to the catalog, {} lines skipped, \
             in {secs:.1} s ({:.0} events/s)",
            self.activity,
            self.orders,
            self.products,
            self.skipped,
            (self.activity + self.orders) as f64 / secs
        )
    }
}

/// What a platform file's first reading found: its products (sent first), how many events
/// it holds, how many lines are skipped.
struct PlatformScan {
    products: Vec<Value>,
    events: usize,
    skipped: usize,
}

/// A line of a platform file: a product, or an event (an order when it has `items`).
enum PlatformLine {
    Product(Value),
    Event { order: bool, value: Value },
    Unreadable,
}

fn platform_line(line: &str) -> PlatformLine {
    // A line whose object gives a key twice is skipped like any unreadable one, not sent
    // with the key's last value.
    match kit::json::value_from_bytes(line.as_bytes()) {
        Ok(v) if v.get("userId").is_none() && v.get("productId").is_some() => PlatformLine::Product(v),
        Ok(v) if v.get("userId").is_some() => PlatformLine::Event { order: v.get("items").is_some(), value: v },
        _ => PlatformLine::Unreadable,
    }
}

fn platform_scan(args: &ImportArgs) -> anyhow::Result<PlatformScan> {
    let mut scan = PlatformScan { products: Vec::new(), events: 0, skipped: 0 };
    for line in history::numbered_lines(&args.file)? {
        let (number, line) = line?;
        match platform_line(&line) {
            PlatformLine::Product(v) => scan.products.push(v),
            PlatformLine::Event { .. } => scan.events += 1,
            PlatformLine::Unreadable => {
                tracing::warn!(line = number, "skipped: neither an event, an order nor a product");
                scan.skipped += 1;
            }
        }
    }
    Ok(scan)
}

/// Reads the file and sends it: products first, then the events in the file's order (the
/// datasets': in time order). The file is read twice, once for its products and once for its
/// events, so that memory holds its products and one batch, not the history.
pub async fn run(args: &ImportArgs) -> anyhow::Result<Summary> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let endpoints = Endpoints { user_activity: args.user_activity_url.clone(), order: args.order_url.clone() };
    let started = Instant::now();
    let skipped;
    let sent = if args.format == Format::Platform {
        let stamp = history::Stamp::of(&args.file)?;
        let scan = platform_scan(args)?;
        skipped = scan.skipped;
        let mut sender = import::Sender::new(&http, &endpoints, usize::from(args.batch), args.rate, scan.events);
        sender.products(&scan.products).await?;
        drop(scan);
        stamp.check(&args.file)?;
        for line in history::numbered_lines(&args.file)? {
            if let PlatformLine::Event { order, value } = platform_line(&line?.1) {
                sender.push(order, value).await?;
            }
        }
        sender.finish().await?
    } else {
        let scan = history::scan(&args.file, args.format)?;
        skipped = scan.skipped;
        let mut sender = import::Sender::new(&http, &endpoints, usize::from(args.batch), args.rate, scan.interactions);
        sender.products(&import::catalog_products(&scan.products)?).await?;
        sender.steps(scan.steps()?).await?;
        sender.finish().await?
    };
    Ok(Summary {
        products: sent.products,
        activity: sent.activity,
        orders: sent.orders,
        skipped,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_lines_are_told_apart_and_unreadable_ones_skipped() {
        let file = std::env::temp_dir().join(format!("events-import-plan-{}.jsonl", std::process::id()));
        std::fs::write(
            &file,
            [
                // A byte-order mark before the first line is not part of it.
                "\u{feff}{\"userId\":\"a\",\"eventType\":\"page_view\"}",
                r#"{"productId":"P1","name":"One","category":"c","price":1}"#,
                r#"{"userId":"b","items":[{"productId":"P1","quantity":1,"unitPrice":1}],"amount":1}"#,
                "not json",
                r#"{"userId":"a","userId":"b","eventType":"page_view"}"#,
                "",
            ]
            .join("\n"),
        )
        .expect("write");
        let args = ImportArgs {
            file: file.clone(),
            format: Format::Platform,
            rate: 0.0,
            batch: 500,
            user_activity_url: String::new(),
            order_url: String::new(),
        };
        let scan = platform_scan(&args).expect("scan");
        let kinds: Vec<bool> = history::numbered_lines(&file)
            .expect("read")
            .filter_map(|line| match platform_line(&line.expect("line").1) {
                PlatformLine::Event { order, .. } => Some(order),
                _ => None,
            })
            .collect();
        std::fs::remove_file(&file).expect("remove");
        assert_eq!((scan.products.len(), scan.events), (1, 2));
        assert_eq!(kinds, [false, true]);
        assert_eq!(scan.skipped, 2, "the line that is not JSON and the one with a repeated key");
    }
}
