//! `retargetiq bench`: measurements that print their baseline, measured in the same run.
//!
//! `bench ingest` starts its own broker (embedded Tansu, in memory, on a thread and runtime of
//! its own) and one `user-activity` service on free ports, then measures for `--duration`
//! each: a plain rdkafka producer (idempotent, `acks=all`, the service's producer settings)
//! writing the same events straight to the topic — the baseline; `POST /api/users/activity`
//! with one event per request; and with batches of `--batch` events per request. Events per
//! second for each, the ratio to the baseline, and request latency percentiles (hdrhistogram).
//! Load generator, service and broker share the machine, as they would on one host.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use events::Topic;
use events::generate::Generator;
use futures::stream::{FuturesUnordered, StreamExt as _};
use hdrhistogram::Histogram;
use kit::kafka::KafkaSettings;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Ingestion throughput and latency against a plain producer.
    Ingest(IngestArgs),
    /// The whole stack: recommendation API, end to end, pipeline rate, memory.
    Stack(crate::bench_stack::StackArgs),
    /// Everything: `ingest`, then `stack`, with their default settings.
    All,
    /// Sustained load over many users, resident memory sampled along the way.
    Soak(crate::bench_stack::SoakArgs),
    /// (Used by `stack`.) Serve a fixed JSON body from a minimal axum handler.
    #[command(hide = true)]
    ServeFixed {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        body_file: std::path::PathBuf,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// How long each scenario runs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Events per batch request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
}

/// One measured scenario.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub events_per_second: f64,
    /// Request latency percentiles in milliseconds (none for the plain producer).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Ingest(args) => {
            let rows = ingest(&args).await?;
            print!("{}", table(&rows));
            Ok(())
        }
        BenchCommand::Stack(args) => crate::bench_stack::run(&args).await,
        BenchCommand::Soak(args) => crate::bench_stack::soak(&args).await,
        BenchCommand::All => {
            let rows = ingest(&IngestArgs { duration: Duration::from_secs(5), concurrency: 32, batch: 100 }).await?;
            println!("Ingestion\n\n{}", table(&rows));
            let args = <crate::bench_stack::StackArgs as clap::Parser>::parse_from(["stack"]);
            crate::bench_stack::run(&args).await
        }
        BenchCommand::ServeFixed { port, body_file } => crate::bench_stack::serve_fixed(port, body_file).await,
    }
}

/// The measured rows as a table, each with its ratio to the first (the baseline).
pub fn table(rows: &[Row]) -> String {
    let base = rows.first().map_or(1.0, |r| r.events_per_second.max(1e-9));
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    let mut out =
        format!("{:<44} {:>12} {:>12} {:>9} {:>9}\n", "scenario", "events/s", "vs baseline", "p50 ms", "p99 ms");
    for r in rows {
        out += &format!(
            "{:<44} {:>12.0} {:>11.2}x {:>9} {:>9}\n",
            r.scenario,
            r.events_per_second,
            r.events_per_second / base,
            ms(r.p50_ms),
            ms(r.p99_ms)
        );
    }
    out
}

/// Runs the ingestion benchmark and returns its rows (baseline first).
pub async fn ingest(args: &IngestArgs) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(args.concurrency > 0 && args.batch > 0, "--concurrency and --batch must be positive");
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free.port()));
    broker::spawn_dedicated(addr, broker::Storage::Memory, shutdown.clone()).await?;
    kit::kafka::admin::ensure_topics(&addr.to_string(), 1, Duration::from_secs(30)).await?;
    let settings = KafkaSettings::for_embedded_broker(addr.to_string());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let service = listener.local_addr()?;
    let stop_service = CancellationToken::new();
    let task = kit::service::start::<user_activity::UserActivity>(
        (),
        settings.clone(),
        kit::http::Cors::Off,
        listener,
        &stop_service,
    );
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    let ready = format!("http://{service}/ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http.get(&ready).send().await.is_ok_and(|r| r.status().is_success()) {
        anyhow::ensure!(Instant::now() < deadline, "user-activity did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same kind of events for every scenario.
    let mut g = Generator::seeded(42);
    let generated: Vec<events::ActivityEvent> = (0..10_000).map(|_| g.activity(Utc::now())).collect();
    let events: Arc<Vec<Vec<u8>>> = Arc::new(generated.iter().map(serde_json::to_vec).collect::<Result<_, _>>()?);
    let keyed: Vec<(&str, &[u8])> =
        generated.iter().zip(events.iter()).map(|(e, p)| (e.user_id.as_str(), p.as_slice())).collect();

    let mut rows = vec![plain_producer(&settings, Topic::UserActivity.name(), &keyed, args.duration).await?];
    let url = format!("http://{service}/api/users/activity");
    rows.push(
        http_load(&http, &url, &events, 1, args, format!("HTTP, 1 event/request, {} clients", args.concurrency))
            .await?,
    );
    rows.push(
        http_load(
            &http,
            &url,
            &events,
            args.batch,
            args,
            format!("HTTP, {} events/request, {} clients", args.batch, args.concurrency),
        )
        .await?,
    );
    // The service first, then (on return) the broker.
    stop_service.cancel();
    let _ = task.await;
    Ok(rows)
}

/// The same events, keyed by user as the service keys them, straight to `topic`.
pub(crate) async fn plain_producer(
    settings: &KafkaSettings,
    topic: &str,
    events: &[(&str, &[u8])],
    duration: Duration,
) -> anyhow::Result<Row> {
    let producer: FutureProducer =
        kit::kafka::producer::client_config(settings).create().context("creating the baseline producer")?;
    let started = Instant::now();
    let (mut acked, mut i) = (0_u64, 0_usize);
    let mut in_flight = FuturesUnordered::new();
    while started.elapsed() < duration {
        while in_flight.len() < 10_000 {
            let (key, payload) = events[i % events.len()];
            i += 1;
            let record = FutureRecord::to(topic).key(key).payload(payload);
            match producer.send_result(record) {
                Ok(delivery) => in_flight.push(delivery),
                Err(_) => break, // the client queue is full: wait for acknowledgements
            }
        }
        if let Some(Ok(Ok(_))) = in_flight.next().await {
            acked += 1;
        }
    }
    while let Some(result) = in_flight.next().await {
        acked += u64::from(matches!(result, Ok(Ok(_))));
    }
    Ok(Row {
        scenario: "plain rdkafka producer (baseline)".into(),
        events_per_second: acked as f64 / started.elapsed().as_secs_f64(),
        p50_ms: None,
        p99_ms: None,
    })
}

async fn http_load(
    http: &reqwest::Client,
    url: &str,
    events: &Arc<Vec<Vec<u8>>>,
    per_request: usize,
    args: &IngestArgs,
    scenario: String,
) -> anyhow::Result<Row> {
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..args.concurrency {
        let (http, url, events, duration) = (http.clone(), url.to_owned(), Arc::clone(events), args.duration);
        clients.spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let (mut accepted, mut i) = (0_u64, c * 997);
            while started.elapsed() < duration {
                let mut body = Vec::with_capacity(per_request * 300);
                if per_request > 1 {
                    body.push(b'[');
                }
                for n in 0..per_request {
                    if n > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&events[i % events.len()]);
                    i += 1;
                }
                if per_request > 1 {
                    body.push(b']');
                }
                let sent = Instant::now();
                let resp = http.post(&url).header("content-type", "application/json").body(body).send().await?;
                let ok = resp.status().as_u16() == 202;
                histogram.record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))?;
                anyhow::ensure!(ok, "the service answered {}", resp.status());
                accepted += per_request as u64;
            }
            anyhow::Ok((accepted, histogram))
        });
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut accepted = 0;
    while let Some(done) = clients.join_next().await {
        let (n, h) = done??;
        accepted += n;
        total.add(h)?;
    }
    Ok(Row {
        scenario,
        events_per_second: accepted as f64 / started.elapsed().as_secs_f64(),
        p50_ms: Some(total.value_at_quantile(0.5) as f64 / 1000.0),
        p99_ms: Some(total.value_at_quantile(0.99) as f64 / 1000.0),
    })
}
