//! Fault injection, the way Kafka's own replication tests check "every acknowledged message
//! was consumed": the real `retargetiq up` (durable broker, ten service processes)
//! under steady traffic, while
//! - every consuming service is killed with `kill -9`, in turn, twice, and `up` restarts it;
//! - the broker is killed with `kill -9` and restarted from its storage;
//! - a downstream service is made slow (frozen with SIGSTOP for 5 s, then resumed).
//!
//! The traffic generator retries each event with the same `eventId` until it gets a `202`, as
//! a client should. Afterwards every acknowledged event is counted exactly once in analytics
//! and in the user's features, and no consumer is left behind (lag 0 everywhere).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use retargetiq::PORTS;
use serde_json::{Value, json};
use testkit::{eventually, free_port};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const CONSUMERS: [&str; 7] =
    ["event-processor", "feature-store", "analytics", "retrieval", "ranking", "rl-offer", "recommendation-api"];
const TYPES: [&str; 3] = ["product_view", "click", "add_to_cart"];

struct Stack {
    up: Child,
    offset: u16,
    http: reqwest::Client,
    _data: tempfile::TempDir,
}

impl Stack {
    async fn start() -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        // `up`'s output, to show when the stack does not come up.
        let log = std::fs::File::create(data.path().join("up.log"))?;
        let broker_port = free_port()?;
        let offset = testkit::stack_port_offset(0)?;
        let up = Command::new(env!("CARGO_BIN_EXE_retargetiq"))
            .args(["up", "--broker-listen", &format!("127.0.0.1:{broker_port}"), "--port-offset", &offset.to_string()])
            .arg("--data-dir")
            .arg(data.path())
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        let stack =
            Self { up, offset, http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?, _data: data };
        if let Err(e) = stack.all_ready().await {
            let out = std::fs::read_to_string(stack._data.path().join("up.log")).unwrap_or_default();
            let tail: Vec<&str> = out.lines().rev().take(40).collect();
            anyhow::bail!(
                "{e}; the last lines of up's output:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(stack)
    }

    fn port(&self, service: &str) -> u16 {
        retargetiq::port_of(service) + self.offset
    }

    async fn get(&self, service: &str, path: &str) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.port(service));
        let resp = self.http.get(url).send().await.ok()?;
        resp.status().is_success().then_some(())?;
        resp.json().await.ok()
    }

    async fn ready(&self, service: &str) -> bool {
        let url = format!("http://127.0.0.1:{}/ready", self.port(service));
        self.http.get(url).send().await.is_ok_and(|r| r.status().is_success())
    }

    async fn all_ready(&self) -> anyhow::Result<()> {
        for (name, _) in PORTS {
            // A cold start on a busy two-core machine: broker, topics, the demo catalog, ten services.
            eventually(&format!("{name} ready"), Duration::from_secs(240), || async {
                self.ready(name).await.then_some(())
            })
            .await?;
        }
        Ok(())
    }

    /// SIGTERM to `up`, which stops the services and the broker, and waits for it to finish
    /// (dropping a running `up` would leave its children behind).
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.up.id() {
            kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM)?;
        }
        let status = tokio::time::timeout(Duration::from_secs(90), self.up.wait()).await??;
        anyhow::ensure!(status.success(), "up exited with {status}");
        Ok(())
    }

    fn pid_of(&self, last_arg: &str) -> Option<i32> {
        retargetiq::child_process(self.up.id()?, last_arg)
    }

    /// `kill -9` the process, then waits for `up` to have restarted it.
    async fn kill9(&self, last_arg: &str) -> anyhow::Result<()> {
        let victim = self.pid_of(last_arg).ok_or_else(|| anyhow::anyhow!("{last_arg} is not running"))?;
        kill(Pid::from_raw(victim), Signal::SIGKILL)?;
        eventually(&format!("{last_arg} restarted"), Duration::from_secs(60), || async {
            self.pid_of(last_arg).filter(|p| *p != victim).map(|_| ())
        })
        .await
    }

    /// Summed consumer lag over every service (librdkafka reports it every 5 s).
    async fn lag(&self) -> f64 {
        let mut total = 0.0;
        for (_, port) in PORTS {
            let url = format!("http://127.0.0.1:{}/metrics", port + self.offset);
            let Ok(resp) = self.http.get(url).send().await else { return f64::INFINITY };
            total += retargetiq::consumer_lag(&resp.text().await.unwrap_or_default());
        }
        total
    }
}

type Accepted = Arc<Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>>;

/// One client: sends events one by one, each retried with its `eventId` until a `202`.
async fn client(n: usize, url: String, stop: CancellationToken, accepted: Accepted) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let mut i = 0_usize;
    while !stop.is_cancelled() {
        let user = format!("fault-{n}-{}", i % 10);
        let kind = TYPES[i % TYPES.len()];
        let event = json!({"eventId": format!("fault-{n}-{i}"), "userId": user, "eventType": kind,
            "productId": format!("P{:05}", 1 + (i * 7 + n) % 2400)});
        let started = Instant::now();
        loop {
            match http.post(&url).json(&event).send().await {
                Ok(r) if r.status().as_u16() == 202 => break,
                Ok(r) if r.status().is_client_error() => anyhow::bail!("a valid event was refused: {}", r.status()),
                _ => {
                    anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "no 202 for {event} in 120 s");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        *accepted.lock().expect("lock").entry(user).or_default().entry(kind).or_default() += 1;
        i += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_things_break() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let stop = CancellationToken::new();
    let accepted: Accepted = Arc::default();
    let url = format!("http://127.0.0.1:{}/api/users/activity", stack.port("user-activity"));
    let clients: Vec<_> =
        (0..4).map(|n| tokio::spawn(client(n, url.clone(), stop.clone(), Arc::clone(&accepted)))).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Every consumer, killed twice in turn while traffic flows.
    for round in 0..2 {
        for service in CONSUMERS {
            stack.kill9(service).await?;
            eprintln!("faults: round {round}: killed and restarted {service}");
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    }
    stack.all_ready().await?;

    // The broker itself, killed and restarted from its SQLite storage.
    stack.kill9("broker").await?;
    eprintln!("faults: killed and restarted the broker");
    stack.all_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A slow downstream: the feature store stops answering for 5 s.
    let slow = stack.pid_of("feature-store").ok_or_else(|| anyhow::anyhow!("no feature store"))?;
    kill(Pid::from_raw(slow), Signal::SIGSTOP)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    kill(Pid::from_raw(slow), Signal::SIGCONT)?;
    eprintln!("faults: froze the feature store for 5 s");
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.cancel();
    for c in clients {
        c.await??;
    }
    let accepted = accepted.lock().expect("lock").clone();
    let total: u64 = accepted.values().flat_map(|m| m.values()).sum();
    eprintln!("faults: {total} events acknowledged for {} users", accepted.len());
    assert!(total > 200, "too little traffic to mean anything: {total}");

    // Exactly once, everywhere: analytics and the feature store agree with what was acknowledged.
    let field = |kind: &str| match kind {
        "product_view" => "productViews",
        "click" => "clicks",
        _ => "addToCart",
    };
    for (user, counts) in &accepted {
        let expected: BTreeMap<&str, u64> = counts.iter().map(|(k, v)| (field(k), *v)).collect();
        let matches = |v: &Value, path: &str| expected.iter().all(|(f, n)| v[path][*f].as_u64() == Some(*n));
        let seen = eventually(&format!("analytics for {user}"), Duration::from_secs(90), || async {
            stack.get("analytics", &format!("/api/analytics/user/{user}")).await.filter(|v| matches(v, "counts"))
        })
        .await;
        let last = stack.get("analytics", &format!("/api/analytics/user/{user}")).await;
        assert!(seen.is_ok(), "analytics for {user}: expected {expected:?}, got {last:?}");
        let features = eventually(&format!("features of {user}"), Duration::from_secs(60), || async {
            stack.get("feature-store", &format!("/features/{user}")).await.filter(|v| matches(v, "counts"))
        })
        .await;
        let last = stack.get("feature-store", &format!("/features/{user}")).await;
        assert!(features.is_ok(), "features of {user}: expected {expected:?}, got {last:?}");
    }

    // Nothing stuck in a partition.
    eventually("every consumer caught up", Duration::from_secs(60), || async {
        (stack.lag().await == 0.0).then_some(())
    })
    .await?;

    stack.stop().await
}
