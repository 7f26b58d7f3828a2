//! `retargetiq simulate`: plays realistic shopper sessions against the ingestion APIs.
//!
//! A population of shoppers, each with a hidden favourite category and purchase propensity
//! (written with `--truth FILE` so recommendation quality can be measured against it), browse
//! in sessions: land, view products (mostly of their category), click, add to cart, then buy
//! or abandon. Several sessions interleave, the way real traffic does; every event is stamped
//! when it is sent. Requests go out at `--rate` events per second for `--duration`, at most
//! `--concurrency` at a time, with a progress line, and a summary at the end.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use events::generate::{Generator, Shopper, Step};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Url;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Events per second to aim for.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// How long to run (`30s`, `5m`, ...).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Size of the shopper population.
    #[arg(long, default_value_t = 200)]
    pub shoppers: u32,
    /// Shopper ids are `<prefix>-0001` ...
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// Seed for a repeatable population and sessions.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long, env = "USER_ACTIVITY_URL", default_value = "http://127.0.0.1:8081")]
    pub activity_url: Url,
    #[arg(long, env = "ORDER_URL", default_value = "http://127.0.0.1:8082")]
    pub order_url: Url,
    /// Write each shopper's hidden preference to this file (JSON lines).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// No progress line (for scripts and tests).
    #[arg(long)]
    pub quiet: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub accepted: u64,
    pub rejected: u64,
    pub failed: u64,
    pub orders: u64,
    pub sessions: u64,
    pub elapsed: Duration,
    /// Request latencies, sorted, in microseconds.
    pub latencies_us: Vec<u64>,
}

impl Summary {
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }

    pub fn report(&self) -> String {
        let sent = self.accepted + self.rejected + self.failed;
        format!(
            "{sent} events in {:.1}s ({:.1}/s): {} accepted, {} rejected, {} failed; {} sessions, {} orders; latency p50 {:.1} ms, p99 {:.1} ms",
            self.elapsed.as_secs_f64(),
            sent as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.accepted,
            self.rejected,
            self.failed,
            self.sessions,
            self.orders,
            self.percentile_ms(0.5),
            self.percentile_ms(0.99)
        )
    }
}

enum Outcome {
    Accepted(u64),
    Rejected(u64),
    Failed,
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<Summary> {
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be a positive number");
    anyhow::ensure!(args.shoppers > 0 && args.concurrency > 0, "--shoppers and --concurrency must be positive");
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut generator = Generator::seeded(seed ^ 0x5151);
    let shoppers: Vec<Shopper> = (1..=args.shoppers).map(|n| Shopper::new(&args.prefix, n, &mut rng)).collect();
    if let Some(path) = &args.truth {
        let lines: Vec<String> = shoppers.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let activity_url = args.activity_url.join("api/users/activity")?;
    let order_url = args.order_url.join("api/orders/place")?;

    // Several sessions in progress at once, each a queue of steps.
    let lanes = (args.shoppers as usize).clamp(1, 16);
    let mut sessions: Vec<VecDeque<Step>> = vec![VecDeque::new(); lanes];
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut summary = Summary::default();
    let progress = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(args.duration.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let (mut budget, mut lane) = (0.0_f64, 0_usize);
    while started.elapsed() < args.duration {
        tick.tick().await;
        budget = (budget + args.rate * 0.02).min(args.rate.max(1.0));
        while budget >= 1.0 {
            budget -= 1.0;
            lane = (lane + 1) % lanes;
            if sessions[lane].is_empty() {
                let shopper = &shoppers[rng.random_range(0..shoppers.len())];
                sessions[lane] = generator.session(shopper, Utc::now()).into();
                summary.sessions += 1;
            }
            let Some(step) = sessions[lane].pop_front() else { continue };
            let (url, body) = match step {
                Step::Activity(mut a) => {
                    a.timestamp = Utc::now();
                    (activity_url.clone(), serde_json::to_vec(&a)?)
                }
                Step::Order(mut o) => {
                    o.timestamp = Utc::now();
                    summary.orders += 1;
                    (order_url.clone(), serde_json::to_vec(&o)?)
                }
            };
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let http = http.clone();
            tasks.spawn(async move {
                let sent = Instant::now();
                let result = http.post(url).header("content-type", "application/json").body(body).send().await;
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                drop(permit);
                match result {
                    Ok(r) if r.status().is_success() => Outcome::Accepted(micros),
                    Ok(r) if r.status().is_client_error() => Outcome::Rejected(micros),
                    _ => Outcome::Failed,
                }
            });
        }
        while let Some(done) = tasks.try_join_next() {
            record(&mut summary, &done);
        }
        progress.set_position(started.elapsed().as_secs());
        progress.set_message(format!(
            "{} accepted, {} rejected, {} failed, {} sessions",
            summary.accepted, summary.rejected, summary.failed, summary.sessions
        ));
    }
    while let Some(done) = tasks.join_next().await {
        record(&mut summary, &done);
    }
    progress.finish_and_clear();
    summary.elapsed = started.elapsed();
    summary.latencies_us.sort_unstable();
    Ok(summary)
}

fn record(summary: &mut Summary, done: &Result<Outcome, tokio::task::JoinError>) {
    match done {
        Ok(Outcome::Accepted(us)) => {
            summary.accepted += 1;
            summary.latencies_us.push(*us);
        }
        Ok(Outcome::Rejected(us)) => {
            summary.rejected += 1;
            summary.latencies_us.push(*us);
        }
        Ok(Outcome::Failed) | Err(_) => summary.failed += 1,
    }
}
