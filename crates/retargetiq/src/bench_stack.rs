//! `retargetiq bench stack`: the whole platform, measured as a user runs it.
//!
//! Starts `retargetiq up` as users run it — the durable embedded broker (log files and
//! SQLite, in a temporary data directory) and the ten services, each its own process, on ports shifted by
//! `--port-offset`; `--memory` for the in-memory broker instead — and measures, each next to a
//! baseline taken in the same run on the same machine:
//!
//! - **idle CPU**: the share of one core each process uses over `--idle` with no traffic;
//!   baseline: the minimal axum server below, idle over the same time.
//! - **memory**: resident memory (VmRSS) of each service process at idle, and the most seen
//!   under load; baseline: a process serving a minimal axum handler.
//! - **recommendation API**: the highest request rate `--concurrency` clients get from
//!   `GET /recommend/{userId}?k=10`, and p50/p99 at a fixed `--reco-rps` (open loop: latency
//!   counted from the scheduled send time, so a stall is not hidden); baseline: the same load
//!   on a minimal axum handler returning a fixed JSON body of the same size, in its own process.
//! - **ingestion**: p50/p99 of `POST /api/users/activity` with one event per request at
//!   `--reco-rps` requests/s; baseline: the minimal handler at the same rate.
//! - **end to end**: with background traffic at `--e2e-rate` events/s (batches of
//!   `rate / 50` events, at most 100, over `--users` users), the time from the `202`
//!   of a product view to a re-ranked list visible on `GET /recommend/{userId}` (polled every
//!   2 ms); baseline: one Kafka hop (produce, then receive in a consumer) on the same broker.
//! - **pipeline**: offered event rates (`--rates`) for `--duration` each; a rate is sustained
//!   when ingestion accepted it and the summed consumer lag of every service (every consumer,
//!   replicas and live readers included: the messages each has not finished) read two seconds
//!   after the step is under one second's worth of events; baseline: the broker's raw produce
//!   rate.
//!
//! Latencies go into hdrhistograms. Load generator, services and broker share the machine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use events::generate::Generator;
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::process::{Child, Command};

/// Options of `retargetiq bench stack`.
#[derive(Debug, Clone, clap::Parser)]
pub struct StackArgs {
    /// How long each load step runs.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Event rates (per second) offered to the pipeline, in order.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,3000,4000,5000,6000,7000,8000,10000")]
    pub rates: Vec<u32>,
    /// Background event rate during the end-to-end measurement.
    #[arg(long, default_value_t = 1000)]
    pub e2e_rate: u32,
    /// Distinct users the generated traffic is spread over.
    #[arg(long, default_value_t = 5_000)]
    pub users: u32,
    /// How long idle CPU is measured.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub idle: Duration,
    /// Run the broker in memory instead of the durable default (log files and SQLite).
    #[arg(long)]
    pub memory: bool,
    /// End-to-end samples.
    #[arg(long, default_value_t = 60)]
    pub e2e_probes: usize,
    /// Fixed request rate for the recommendation API's latency.
    #[arg(long, default_value_t = 1000)]
    pub reco_rps: u32,
    /// Concurrent clients for the highest request rate.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Added to the contract ports (so a running stack is not disturbed).
    #[arg(long, default_value_t = 20_000)]
    pub port_offset: u16,
}

use crate::PORTS as SERVICES;

/// A running `retargetiq up`.
struct Stack {
    up: Child,
    /// Each service runs from its own binary (else `retargetiq service <name>`).
    dedicated: bool,
    offset: u16,
    broker: String,
    http: reqwest::Client,
}

/// How often the benchmarked stack's consumers report their lag (`KAFKA_STATISTICS_INTERVAL_MS`).
const LAG_REPORT_EVERY: Duration = Duration::from_secs(1);

impl Stack {
    async fn start(offset: u16, data_dir: Option<&std::path::Path>, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let broker = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
        let log = std::env::temp_dir().join("retargetiq-bench-stack.log");
        let out = std::fs::File::create(&log)?;
        let exe = std::env::current_exe()?;
        // The services' own binaries when they were built (as in the Docker images), and only
        // if they are as new as the sources: a run would otherwise measure old services.
        let dedicated = SERVICES.iter().all(|(name, _)| exe.with_file_name(name).is_file());
        if dedicated {
            crate::up::check_service_binaries(&exe).context("bench")?;
        }
        let mut up_args = vec!["up", "--broker-listen", &broker];
        let data_arg = data_dir.map(|d| d.display().to_string());
        match &data_arg {
            Some(dir) => up_args.extend(["--data-dir", dir.as_str()]),
            None => up_args.push("--memory"),
        }
        let offset_arg = offset.to_string();
        up_args.extend(["--port-offset", &offset_arg]);
        if dedicated {
            up_args.push("--service-binaries");
        }
        let up = Command::new(exe)
            .args(&up_args)
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            // Lag reported every second (not every 5 s), so that it is read right after a step.
            .env("KAFKA_STATISTICS_INTERVAL_MS", LAG_REPORT_EVERY.as_millis().to_string())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting retargetiq up")?;
        let stack = Self { up, dedicated, offset, broker, http: reqwest::Client::builder().build()? };
        eprintln!("bench: starting the stack (log: {})", log.display());
        let deadline = Instant::now() + Duration::from_secs(180);
        for (name, _) in SERVICES {
            while !stack.http.get(stack.url(name, "/ready")).send().await.is_ok_and(|r| r.status().is_success()) {
                anyhow::ensure!(Instant::now() < deadline, "{name} did not become ready; see {}", log.display());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(stack)
    }

    fn url(&self, service: &str, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", crate::port_of(service) + self.offset)
    }

    /// Resident memory of each service process (and the broker), in bytes.
    fn rss(&self) -> BTreeMap<String, u64> {
        self.processes().into_iter().filter_map(|(name, pid)| Some((name, rss_of(pid)?))).collect()
    }

    /// CPU time used so far by each process of the stack (`up` itself included), in ticks.
    fn cpu_ticks(&self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> =
            self.processes().into_iter().filter_map(|(name, pid)| Some((name, cpu_ticks_of(pid)?))).collect();
        if let Some(ticks) = self.up.id().and_then(cpu_ticks_of) {
            out.insert("(retargetiq up)".to_owned(), ticks);
        }
        out
    }

    /// The pid of each service process (and of the broker, as `(broker)`).
    fn processes(&self) -> BTreeMap<String, u32> {
        let Some(up) = self.up.id() else { return BTreeMap::new() };
        let mut out = BTreeMap::new();
        for (pid, cmdline) in crate::child_processes(up) {
            let program = cmdline.first().and_then(|p| p.rsplit('/').next()).unwrap_or_default();
            let name = match cmdline.get(1).map(String::as_str) {
                Some("service") => cmdline.get(2).cloned(),
                Some("broker") => Some("(broker)".to_owned()),
                None if SERVICES.iter().any(|(n, _)| *n == program) => Some(program.to_owned()),
                _ => None,
            };
            if let Some(name) = name {
                out.insert(name, pid);
            }
        }
        out
    }

    /// Summed `kafka_consumer_lag` of every service.
    async fn total_lag(&self) -> f64 {
        let mut total = 0.0;
        for (name, _) in SERVICES {
            let Ok(resp) = self.http.get(self.url(name, "/metrics")).send().await else { continue };
            total += crate::consumer_lag(&resp.text().await.unwrap_or_default());
        }
        total
    }

    async fn stop(mut self) {
        if let Some(pid) = self.up.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(60), self.up.wait()).await.is_err() {
            let _ = self.up.kill().await;
        }
    }
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// User and system CPU time of `pid` in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks_of(pid: u32) -> Option<u64> {
    let fields = crate::proc_stat(&format!("/proc/{pid}/stat"))?;
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(ticks(crate::stat_field::USER_TICKS)? + ticks(crate::stat_field::SYSTEM_TICKS)?)
}

/// The niceness of process `pid` (its main thread's).
fn niceness_of(pid: u32) -> Option<i32> {
    crate::proc_stat(&format!("/proc/{pid}/stat"))?.get(crate::stat_field::NICENESS)?.parse().ok()
}

/// Clock ticks per second in `/proc` (`USER_HZ`, 100 on every Linux architecture we run on).
const TICKS_PER_SECOND: f64 = 100.0;

/// The share of one core each process used between two [`Stack::cpu_ticks`] readings.
fn cpu_shares(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, over: Duration) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(name, end)| {
            let start = before.get(name)?;
            Some((name.clone(), end.saturating_sub(*start) as f64 / TICKS_PER_SECOND / over.as_secs_f64()))
        })
        .collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// `p50 | p99 | max` in milliseconds, for a table row.
fn percentiles(h: &Histogram<u64>) -> String {
    format!("{:.2} | {:.2} | {:.2}", ms(h, 0.5), ms(h, 0.99), h.max() as f64 / 1000.0)
}

/// Posts `events` as one batch; returns how many were accepted.
async fn post_batch(http: &reqwest::Client, url: &str, events: &[events::ActivityEvent]) -> usize {
    match http.post(url).json(events).send().await {
        Ok(r) if r.status().as_u16() == 202 => events.len(),
        _ => 0,
    }
}

/// Offers `rate` events/s in batches for `duration`, each event made by `next`; returns the
/// events accepted.
async fn offer_load(
    http: &reqwest::Client,
    url: &str,
    rate: u32,
    duration: Duration,
    mut next: impl FnMut() -> events::ActivityEvent,
) -> usize {
    let batch = (rate / 50).clamp(1, 100) as usize;
    let interval = Duration::from_secs_f64(batch as f64 / f64::from(rate.max(1)));
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = tokio::task::JoinSet::new();
    let mut accepted = 0;
    while started.elapsed() < duration {
        tick.tick().await;
        let events: Vec<_> = (0..batch).map(|_| next()).collect();
        let (http, url) = (http.clone(), url.to_owned());
        sends.spawn(async move { post_batch(&http, &url, &events).await });
        while let Some(n) = sends.try_join_next() {
            accepted += n.unwrap_or(0);
        }
    }
    while let Some(n) = sends.join_next().await {
        accepted += n.unwrap_or(0);
    }
    accepted
}

/// Random events from `seed`, spread evenly over `users` shoppers (`shopper-<n>`), each
/// looking at products that fit their own taste.
fn generated(seed: u64, users: u32) -> impl FnMut() -> events::ActivityEvent {
    let mut g = Generator::seeded(seed);
    let mut n: u64 = 0;
    move || {
        n += 1;
        let mut e = g.activity(Utc::now());
        let user = format!("shopper-{}", n.wrapping_mul(2_654_435_761) % u64::from(users.max(1)));
        if e.product_id.is_some() {
            e.product_id = Some(g.product_for(&user).id.clone());
        }
        e.session_id = None;
        e.user_id = user;
        e
    }
}

/// The highest request rate `concurrency` clients get from `url` in `duration`, and latencies.
async fn closed_loop(url: &str, concurrency: usize, duration: Duration) -> anyhow::Result<(f64, Histogram<u64>)> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, url) = (http.clone(), url.to_owned());
        clients.spawn(async move {
            let (mut h, mut n) = (histogram(), 0_u64);
            while started.elapsed() < duration {
                let sent = Instant::now();
                let resp = http.get(&url).send().await?;
                anyhow::ensure!(resp.status().is_success(), "{url} answered {}", resp.status());
                resp.bytes().await?;
                h.record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))?;
                n += 1;
            }
            anyhow::Ok((n, h))
        });
    }
    let (mut total, mut h) = (0, histogram());
    while let Some(r) = clients.join_next().await {
        let (n, part) = r??;
        total += n;
        h.add(part)?;
    }
    Ok((total as f64 / started.elapsed().as_secs_f64(), h))
}

/// Latencies of `GET url` at a fixed request rate, counted from each request's scheduled time.
async fn open_loop(url: &str, rps: u32, duration: Duration) -> anyhow::Result<Histogram<u64>> {
    let url = url.to_owned();
    open_loop_with(rps, duration, move |http, _| http.get(&url)).await
}

/// Latencies of the requests `request` makes (the n-th given `n`) at a fixed rate, counted
/// from each request's scheduled time; a request that fails is not counted.
async fn open_loop_with(
    rps: u32,
    duration: Duration,
    request: impl Fn(&reqwest::Client, u32) -> reqwest::RequestBuilder,
) -> anyhow::Result<Histogram<u64>> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rps.max(1)));
    let started = tokio::time::Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    let mut n: u32 = 0;
    while started.elapsed() < duration {
        let scheduled = started + interval * n;
        n += 1;
        tokio::time::sleep_until(scheduled).await;
        let sent = request(&http, n);
        requests.spawn(async move {
            let resp = sent.send().await.ok()?.error_for_status().ok()?;
            resp.bytes().await.ok()?;
            Some(u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))
        });
    }
    let mut h = histogram();
    while let Some(r) = requests.join_next().await {
        if let Ok(Some(us)) = r {
            h.record(us)?;
        }
    }
    Ok(h)
}

/// A process serving `body` from a minimal axum handler: `retargetiq bench serve-fixed`.
pub async fn serve_fixed(port: u16, body_file: PathBuf) -> anyhow::Result<()> {
    let body: &'static str = Box::leak(std::fs::read_to_string(body_file)?.into_boxed_str());
    let app = axum::Router::new().route(
        "/fixed",
        axum::routing::get(move || async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], body) }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

struct Baseline {
    child: Child,
    url: String,
}

async fn start_baseline(body: &str) -> anyhow::Result<Baseline> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let file = std::env::temp_dir().join("retargetiq-bench-fixed.json");
    std::fs::write(&file, body)?;
    let child = Command::new(std::env::current_exe()?)
        .args(["bench", "serve-fixed", "--port", &port.to_string(), "--body-file"])
        .arg(&file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}/fixed");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
        anyhow::ensure!(Instant::now() < deadline, "the baseline server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Baseline { child, url })
}

/// One Kafka hop on the stack's broker: produce, then receive in an assigned consumer.
async fn kafka_hop(broker: &str, samples: usize) -> anyhow::Result<Histogram<u64>> {
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = "bench-hop";
    kit::kafka::admin::ensure_named_topics(broker, &[(topic.to_owned(), 1)], 1, Duration::from_secs(10)).await?;
    let settings = kit::kafka::KafkaSettings::for_embedded_broker(broker);
    let producer: FutureProducer = kit::kafka::producer::client_config(&settings).create()?;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", "bench-hop")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::End)?;
    consumer.assign(&tpl)?;
    // Warm up until the consumer sees what is produced.
    let mut h = histogram();
    let mut warm = 0;
    while h.len() < samples as u64 {
        let sent = Instant::now();
        producer
            .send(FutureRecord::to(topic).key("k").payload("x"), Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
        match tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
            Ok(Ok(_)) if warm >= 10 => {
                h.record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))?;
            }
            Ok(Ok(_)) => warm += 1,
            _ => anyhow::ensure!(warm < 1000, "the consumer receives nothing"),
        }
    }
    Ok(h)
}

fn generated_at(v: &Value) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(v["generatedAt"].as_str()?).ok()
}

/// Runs every measurement and prints the tables.
pub async fn run(args: &StackArgs) -> anyhow::Result<()> {
    let data = (!args.memory).then(|| std::env::temp_dir().join(format!("retargetiq-bench-{}", std::process::id())));
    if let Some(dir) = &data {
        std::fs::create_dir_all(dir)?;
    }
    let stack = Stack::start(args.port_offset, data.as_deref(), &[]).await?;
    let result = measure(&stack, args).await;
    stack.stop().await;
    if let Some(dir) = &data {
        let _ = std::fs::remove_dir_all(dir);
    }
    println!("{}", result?);
    Ok(())
}

async fn measure(stack: &Stack, args: &StackArgs) -> anyhow::Result<String> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let mut report = String::new();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = stack.rss();
    anyhow::ensure!(idle.len() >= 10, "found {} service processes: {idle:?}", idle.len());

    // Users with recommendations, for the API and the end-to-end probes.
    let ingest = stack.url("user-activity", "/api/users/activity");
    let mut g = Generator::seeded(7);
    let catalog = catalog::Catalog::demo();
    for chunk in 0..20 {
        let events: Vec<_> = (0..10)
            .flat_map(|u| {
                let user = format!("bench-{:03}", chunk * 10 + u);
                (0..5).map(move |_| user.clone())
            })
            .map(|user| {
                let mut e = g.activity(Utc::now());
                e.event_type = events::EventType::ProductView;
                e.product_id = Some(g.product_for(&user).id.clone());
                e.user_id = user;
                e.query = None;
                e
            })
            .collect();
        post_batch(&http, &ingest, &events).await;
    }
    let reco = |user: &str| stack.url("recommendation-api", &format!("/recommend/{user}?k=10"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let sample = loop {
        let v: Value = http.get(reco("bench-199")).send().await?.json().await?;
        if v["coldStart"] == false {
            break v;
        }
        anyhow::ensure!(Instant::now() < deadline, "the seeded users got no recommendations");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Idle CPU of every process, against the minimal server idle over the same time.
    let baseline = start_baseline(&serde_json::to_string(&sample)?).await?;
    let baseline_rss = baseline.child.id().and_then(rss_of).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let baseline_ticks = || baseline.child.id().and_then(cpu_ticks_of).unwrap_or(0);
    let (before, base_before) = (stack.cpu_ticks(), baseline_ticks());
    tokio::time::sleep(args.idle).await;
    let idle_cpu = cpu_shares(&before, &stack.cpu_ticks(), args.idle);
    let base_idle = baseline_ticks().saturating_sub(base_before) as f64 / TICKS_PER_SECOND / args.idle.as_secs_f64();
    let stack_idle: f64 = idle_cpu.values().sum();
    report += &format!(
        "Idle CPU over {} s with no traffic ({} broker), share of one core\n\n\
         | process | idle CPU | niceness |\n|---|---:|---:|\n| minimal axum server (baseline) | {:.2} % | |\n",
        args.idle.as_secs(),
        if args.memory { "in-memory" } else { "durable" },
        100.0 * base_idle
    );
    let pids = stack.processes();
    for (name, share) in &idle_cpu {
        let niceness = pids.get(name).and_then(|&pid| niceness_of(pid)).map(|n| n.to_string()).unwrap_or_default();
        report += &format!("| {name} | {:.2} % | {niceness} |\n", 100.0 * share);
    }
    report += &format!("| **whole stack** | **{:.2} %** (goal: under 5 %) | |\n\n", 100.0 * stack_idle);

    let (base_rate, base_closed) = closed_loop(&baseline.url, args.concurrency, args.duration).await?;
    let base_open = open_loop(&baseline.url, args.reco_rps, args.duration).await?;
    let (api_rate, api_closed) = closed_loop(&reco("bench-042"), args.concurrency, args.duration).await?;
    let api_open = open_loop(&reco("bench-042"), args.reco_rps, args.duration).await?;
    let mut g = generated(3, args.users);
    let singles: Vec<String> = (0..args.reco_rps as usize * args.duration.as_secs().max(1) as usize + 64)
        .map(|_| serde_json::to_string(&g()))
        .collect::<Result<_, _>>()?;
    let ingest_open = open_loop_with(args.reco_rps, args.duration, |http, n| {
        let body = singles[n as usize % singles.len()].clone();
        http.post(&ingest).header("content-type", "application/json").body(body)
    })
    .await?;
    drop(baseline);
    report += &format!(
        "Recommendation API, {} clients for the highest rate, {} req/s for latency\n\n\
         | server | highest req/s | vs baseline | p50 ms | p99 ms | p50 ms @{} | p99 ms @{} |\n\
         |---|---:|---:|---:|---:|---:|---:|\n\
         | minimal axum handler, same body (baseline) | {:.0} | 1.00x | {:.2} | {:.2} | {:.2} | {:.2} |\n\
         | GET /recommend/{{userId}}?k=10 | {:.0} | {:.2}x | {:.2} | {:.2} | {:.2} | {:.2} |\n\n",
        args.concurrency,
        args.reco_rps,
        args.reco_rps,
        args.reco_rps,
        base_rate,
        ms(&base_closed, 0.5),
        ms(&base_closed, 0.99),
        ms(&base_open, 0.5),
        ms(&base_open, 0.99),
        api_rate,
        api_rate / base_rate,
        ms(&api_closed, 0.5),
        ms(&api_closed, 0.99),
        ms(&api_open, 0.5),
        ms(&api_open, 0.99),
    );
    report += &format!(
        "Ingestion, one event per request at {} req/s over {} users ({} answered 202)\n\n\
         | server | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|\n\
         | minimal axum handler, GET (baseline) | {} |\n\
         | POST /api/users/activity | {} |\n\n",
        args.reco_rps,
        args.users,
        ingest_open.len(),
        percentiles(&base_open),
        percentiles(&ingest_open),
    );

    // End to end, under background traffic.
    let hop = kafka_hop(&stack.broker, 200).await?;
    let background = {
        let (http, url, rate, users) = (http.clone(), ingest.clone(), args.e2e_rate, args.users);
        let seconds = (args.e2e_probes as u64 / 4).max(10) + 30;
        tokio::spawn(
            async move { offer_load(&http, &url, rate, Duration::from_secs(seconds), generated(11, users)).await },
        )
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut e2e = histogram();
    let (mut missed, mut refused) = (0, 0);
    for i in 0..args.e2e_probes {
        let user = format!("bench-{:03}", i % 200);
        let before: Value = http.get(reco(&user)).send().await?.json().await?;
        let before = generated_at(&before);
        let product = catalog.products()[(i * 37) % catalog.products().len()].id.clone();
        let view = serde_json::json!({"userId": user, "eventType": "product_view", "productId": product});
        let resp = http.post(&ingest).json(&view).send().await?;
        if resp.status().as_u16() != 202 {
            refused += 1;
            continue;
        }
        let accepted = Instant::now();
        loop {
            let now: Value = http.get(reco(&user)).send().await?.json().await?;
            if generated_at(&now) > before {
                e2e.record(u64::try_from(accepted.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))?;
                break;
            }
            if accepted.elapsed() > Duration::from_secs(10) {
                missed += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    background.abort();
    report += &format!(
        "End to end: 202 of a product view -> re-ranked list on GET /recommend, {} probes, background {} events/s \
         over {} users in batches of {}\n\n\
         | path | p50 ms | p99 ms | max ms | vs baseline (p50) |\n|---|---:|---:|---:|---:|\n\
         | one Kafka hop: produce -> consume (baseline) | {} | 1.00x |\n\
         | view -> processor -> features -> candidates -> ranking -> API view | {} | {:.1}x |\n{}\n",
        e2e.len(),
        args.e2e_rate,
        args.users,
        (args.e2e_rate / 50).clamp(1, 100),
        percentiles(&hop),
        percentiles(&e2e),
        ms(&e2e, 0.5) / ms(&hop, 0.5).max(1e-9),
        if missed + refused > 0 {
            format!("({missed} probes saw no change within 10 s; {refused} probe views were refused with a 5xx)\n")
        } else {
            String::new()
        },
    );

    // The pipeline's highest sustained rate, against the broker's raw produce rate: the same
    // events to a topic of the same partitions that nothing reads (written to the pipeline's
    // input, a fast broker's few seconds of raw produce would still be queued in the pipeline
    // when the first step starts).
    let raw = {
        let settings = kit::kafka::KafkaSettings::for_embedded_broker(stack.broker.clone());
        let topic = "bench-raw-produce";
        kit::kafka::admin::ensure_named_topics(
            &stack.broker,
            &[(topic.to_owned(), events::Topic::UserActivity.default_partitions())],
            1,
            Duration::from_secs(30),
        )
        .await?;
        let mut g = Generator::seeded(5);
        let generated: Vec<events::ActivityEvent> = (0..10_000).map(|_| g.activity(Utc::now())).collect();
        let payloads: Vec<Vec<u8>> = generated.iter().map(serde_json::to_vec).collect::<Result<_, _>>()?;
        let keyed: Vec<(&str, &[u8])> =
            generated.iter().zip(&payloads).map(|(e, p)| (e.user_id.as_str(), p.as_slice())).collect();
        crate::bench::plain_producer(&settings, topic, &keyed, Duration::from_secs(5)).await?.events_per_second
    };
    // Let the end-to-end background traffic drain first.
    drain(stack, Duration::from_secs(120)).await;
    let mut peak = stack.rss();
    report += &format!(
        "Pipeline: offered rate for each step ({} s, batches of rate/50 events, at most 100, over {} users), \
         lag (messages not yet finished) summed over every consumer 2 s after the step's end\n\n",
        args.duration.as_secs(),
        args.users
    );
    report += "\
               | offered events/s | accepted events/s | lag at end (messages) | sustained | vs broker raw produce |\n\
               |---:|---:|---:|---|---:|\n";
    report += &format!("| broker raw produce (baseline) | {raw:.0} | | | 1.00x |\n");
    let mut best = 0.0;
    for (step, rate) in args.rates.iter().enumerate() {
        let started = Instant::now();
        let accepted = offer_load(&http, &ingest, *rate, args.duration, generated(100 + step as u64, args.users)).await;
        let accepted_rate = accepted as f64 / started.elapsed().as_secs_f64();
        // Consumers report their lag every LAG_REPORT_EVERY: wait for a report made after the
        // step ended, and no longer (what drains in that time counts as kept up with).
        tokio::time::sleep(LAG_REPORT_EVERY * 2).await;
        let lag = stack.total_lag().await;
        for (name, rss) in stack.rss() {
            let slot = peak.entry(name).or_default();
            *slot = (*slot).max(rss);
        }
        let sustained = accepted_rate >= 0.95 * f64::from(*rate) && lag < f64::from(*rate);
        if sustained {
            best = accepted_rate;
        }
        report += &format!(
            "| {rate} | {accepted_rate:.0} | {lag:.0} | {} | {:.3}x |\n",
            if sustained { "yes" } else { "no" },
            accepted_rate / raw
        );
        if !sustained || !drain(stack, Duration::from_secs(120)).await {
            break;
        }
    }
    report +=
        &format!("\nhighest sustained: {best:.0} events/s = {:.3}x the broker's raw produce rate\n\n", best / raw);

    // Memory.
    report += &format!(
        "Resident memory (VmRSS), services run {}\n\n| process | idle MiB | under load (peak seen) MiB |\n|---|---:|---:|\n",
        if stack.dedicated {
            "from their own binaries"
        } else {
            "as `retargetiq service <name>` (build the service binaries, `cargo build --release --bins`, to measure those)"
        }
    );
    report += &format!("| minimal axum server (baseline) | {:.1} | |\n", mib(baseline_rss));
    let (mut idle_total, mut load_total) = (0, 0);
    for (name, _) in SERVICES {
        let (i, l) = (idle.get(name).copied().unwrap_or(0), peak.get(name).copied().unwrap_or(0));
        idle_total += i;
        load_total += l;
        report += &format!("| {name} | {:.1} | {:.1} |\n", mib(i), mib(l));
    }
    report += &format!(
        "| **the ten services** | **{:.1}** ({:.1}x baseline) | **{:.1}** |\n",
        mib(idle_total),
        idle_total as f64 / baseline_rss.max(1) as f64,
        mib(load_total)
    );
    if let (Some(i), Some(l)) = (idle.get("(broker)"), peak.get("(broker)")) {
        report += &format!(
            "| embedded broker (Tansu, {}) | {:.1} | {:.1} |\n",
            if args.memory { "in memory" } else { "log files and SQLite" },
            mib(*i),
            mib(*l)
        );
        report += &format!("| whole stack | {:.1} | {:.1} |\n", mib(idle_total + i), mib(load_total + l));
    }
    Ok(report)
}

/// Waits until the summed lag is zero; false if it is not within `patience`.
async fn drain(stack: &Stack, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if stack.total_lag().await < 1.0 {
            return true;
        }
    }
    false
}

/// Options of `retargetiq bench soak`.
#[derive(Debug, Clone, clap::Parser)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Events per second.
    #[arg(long, default_value_t = 400)]
    pub rate: u32,
    /// Distinct users the events are spread over.
    #[arg(long, default_value_t = 1_000_000)]
    pub users: u32,
    /// `MAX_USERS` given to the services.
    #[arg(long, default_value_t = 20_000)]
    pub max_users: usize,
    /// How often resident memory is sampled.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub every: Duration,
    #[arg(long, default_value_t = 22_000)]
    pub port_offset: u16,
}

/// Sustained load over many more users than `MAX_USERS`, with every process's resident memory
/// sampled along the way: bounded state shows as a plateau. The broker keeps its data on disk
/// under a temporary directory (in memory it would hold every event).
pub async fn soak(args: &SoakArgs) -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("retargetiq-soak-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let stack = Stack::start(args.port_offset, Some(&data), &[("MAX_USERS", args.max_users.to_string())]).await?;
    let result = soak_with(&stack, args).await;
    stack.stop().await;
    let _ = std::fs::remove_dir_all(&data);
    println!("{}", result?);
    Ok(())
}

async fn soak_with(stack: &Stack, args: &SoakArgs) -> anyhow::Result<String> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let url = stack.url("user-activity", "/api/users/activity");
    let (rate, users, duration) = (args.rate, args.users, args.duration);
    // Users spread over the whole pool: each new one is state the services must bound.
    let load = tokio::spawn(async move { offer_load(&http, &url, rate, duration, generated(99, users)).await });
    let mut samples: Vec<(Duration, BTreeMap<String, u64>)> = vec![(Duration::ZERO, stack.rss())];
    let started = Instant::now();
    while !load.is_finished() {
        tokio::time::sleep(args.every.min(Duration::from_secs(5))).await;
        if started.elapsed() >= args.every * u32::try_from(samples.len()).unwrap_or(u32::MAX) {
            samples.push((started.elapsed(), stack.rss()));
        }
    }
    let accepted = load.await?;
    samples.push((started.elapsed(), stack.rss()));
    tokio::time::sleep(LAG_REPORT_EVERY * 2).await;
    let lag = stack.total_lag().await;
    let mut out = format!(
        "Soak: {accepted} events accepted over {} s at {} events/s, spread over {} users; MAX_USERS={}; lag at the end {lag:.0}\n\n",
        args.duration.as_secs(),
        args.rate,
        args.users,
        args.max_users
    );
    out += "| minute | ten services MiB |";
    let names: Vec<&str> = SERVICES.iter().map(|(n, _)| *n).collect();
    for n in &names {
        out += &format!(" {n} |");
    }
    out += " broker MiB |\n|---:|---:|";
    out += &"---:|".repeat(names.len() + 1);
    out += "\n";
    for (at, rss) in &samples {
        let ten: u64 = names.iter().filter_map(|n| rss.get(*n)).sum();
        out += &format!("| {:.1} | {:.1} |", at.as_secs_f64() / 60.0, mib(ten));
        for n in &names {
            out += &format!(" {:.1} |", mib(rss.get(*n).copied().unwrap_or(0)));
        }
        out += &format!(" {:.1} |\n", mib(rss.get("(broker)").copied().unwrap_or(0)));
    }
    Ok(out)
}
