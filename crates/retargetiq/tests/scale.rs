//! A second and a third instance of the event processor, the feature store and analytics,
//! started beside `retargetiq up` on the same durable broker with nothing but another
//! `HTTP_PORT`, never process a message twice: they wait as standbys, and when the running
//! instances are killed with `kill -9` under steady traffic, the standbys (or `up`'s restarts)
//! take over from the committed offsets. Every acknowledged event is counted exactly once.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{eventually, free_port};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

const STATEFUL: [(&str, u16); 3] = [("event-processor", 8083), ("analytics", 8084), ("feature-store", 8085)];
const USERS: usize = 30;

async fn get_json(http: &reqwest::Client, port: u16, path: &str) -> Option<serde_json::Value> {
    http.get(format!("http://127.0.0.1:{port}{path}")).send().await.ok()?.json().await.ok()
}

/// Starts `retargetiq service <name>` against `broker` on `port` with `KAFKA_ASSIGNMENT` =
/// `assignment`, collecting its output lines.
fn extra_instance(
    name: &str,
    broker: &str,
    port: u16,
    assignment: &str,
    locks: &std::path::Path,
    lines: &Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<Child> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_retargetiq"))
        .args(["service", name])
        .env("KAFKA_BOOTSTRAP_SERVERS", broker)
        .env("KAFKA_ASSIGNMENT", assignment)
        .env("HTTP_PORT", port.to_string())
        .env("RETARGETIQ_LOCK_DIR", locks)
        .envs(kit::kafka::EMBEDDED_BROKER_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (sink, name) = (Arc::clone(lines), name.to_owned());
    tokio::spawn(async move {
        let mut out = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = out.next_line().await {
            sink.lock().expect("lock").push(format!("{name}: {line}"));
        }
    });
    Ok(child)
}

/// A running `retargetiq up` on a durable broker in a temporary directory, its ports shifted.
struct Up {
    child: Child,
    broker: String,
    offset: u16,
    locks: tempfile::TempDir,
    _data: tempfile::TempDir,
}

impl Up {
    /// Starts `up` with `KAFKA_ASSIGNMENT` = `assignment` (inherited by its services).
    fn start(spread: u16, assignment: &str) -> anyhow::Result<Self> {
        let (data, locks) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let broker = format!("127.0.0.1:{}", free_port()?);
        let offset = testkit::stack_port_offset(spread)?;
        let child = Command::new(env!("CARGO_BIN_EXE_retargetiq"))
            .args(["up", "--broker-listen", &broker, "--port-offset", &offset.to_string()])
            .arg("--data-dir")
            .arg(data.path())
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .env("KAFKA_ASSIGNMENT", assignment)
            .env("RETARGETIQ_LOCK_DIR", locks.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { child, broker, offset, locks, _data: data })
    }

    /// Stops it with SIGTERM and waits for it.
    async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
        kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM)?;
        tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await??;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_instances_wait_as_standbys_and_take_over() -> anyhow::Result<()> {
    let stack = Up::start(3_000, "static")?;
    let (broker, offset, locks) = (stack.broker.clone(), stack.offset, stack.locks.path().to_owned());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    for port in [3000, 8081, 8082, 8083, 8084, 8085, 8086, 8087, 8088, 8089] {
        eventually(&format!("the service on {}", port + offset), Duration::from_secs(90), || {
            let http = http.clone();
            async move {
                let r = http.get(format!("http://127.0.0.1:{}/ready", port + offset)).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await?;
    }

    // Two more instances of each stateful service, with only another HTTP_PORT.
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut extras = Vec::new();
    for (name, port) in STATEFUL {
        for k in 1..=2 {
            extras.push(extra_instance(name, &broker, port + offset + 1000 * k, "static", &locks, &lines)?);
        }
    }
    eventually("every extra instance waiting as a standby", Duration::from_secs(30), || {
        let n = lines.lock().expect("lock").iter().filter(|l| l.contains("waiting as a standby")).count();
        async move { (n == 2 * STATEFUL.len()).then_some(()) }
    })
    .await?;

    // Steady traffic: each user's views, each retried until acknowledged.
    let ingest = format!("http://127.0.0.1:{}/api/users/activity", 8081 + offset);
    let load = {
        let (http, ingest) = (http.clone(), ingest.clone());
        tokio::spawn(async move {
            let mut acked: BTreeMap<String, u64> = BTreeMap::new();
            for round in 0..8 {
                for u in 0..USERS {
                    let user = format!("scale-{u}");
                    let body = serde_json::json!({"eventId": format!("v{round}"), "userId": user,
                        "eventType": "product_view", "productId": "P00042"});
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    loop {
                        let ok = http.post(&ingest).json(&body).send().await.is_ok_and(|r| r.status().as_u16() == 202);
                        if ok {
                            *acked.entry(user).or_default() += 1;
                            break;
                        }
                        anyhow::ensure!(tokio::time::Instant::now() < deadline, "ingestion refused {user} for 60 s");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            anyhow::Ok(acked)
        })
    };

    // Mid-traffic, kill -9 the instances that `up` started.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let up_pid = stack.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    for (name, _) in STATEFUL {
        let victim = retargetiq::child_process(up_pid, name).ok_or_else(|| anyhow::anyhow!("no {name} child"))?;
        kill(Pid::from_raw(victim), Signal::SIGKILL)?;
    }
    let acked = load.await??;
    assert_eq!(acked.len(), USERS);

    // Whoever runs now — a standby that took over, or `up`'s restart — answers on its own port:
    // look at every instance's port for each service and take the one that answers.
    let answering = |path: String, port: u16| {
        let http = http.clone();
        async move {
            for k in 0..=2 {
                let p = port + offset + 1000 * k;
                if let Some(v) = get_json(&http, p, &path).await {
                    return Some(v);
                }
            }
            None
        }
    };
    for (user, n) in &acked {
        let stats = eventually(&format!("analytics for {user}"), Duration::from_secs(90), || {
            let path = format!("/api/analytics/user/{user}");
            async move { answering(path, 8084).await.filter(|u| u["counts"]["productViews"].as_u64() >= Some(*n)) }
        })
        .await?;
        assert_eq!(stats["counts"]["productViews"].as_u64(), Some(*n), "{user} counted once per event: {stats}");
        let features = eventually(&format!("features of {user}"), Duration::from_secs(90), || {
            let path = format!("/features/{user}");
            async move { answering(path, 8085).await.filter(|f| f["counts"]["productViews"].as_u64() >= Some(*n)) }
        })
        .await?;
        assert_eq!(features["counts"]["productViews"].as_u64(), Some(*n), "{user}: {features}");
    }

    for mut child in extras {
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
    stack.stop().await
}

/// Under the group protocol (`KAFKA_ASSIGNMENT=group`, for Apache Kafka) a second instance of
/// the feature store and of analytics, started with nothing but another `HTTP_PORT`, takes a
/// share of the partitions: each user's state is then held by exactly one instance, counted
/// once; when the extra instances stop, the first ones take their partitions back and rebuild
/// those users. (Members leave gracefully here: the embedded broker's groups do not survive a
/// member killed during a rebalance, see docs/broker.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_the_partitions_under_the_group_protocol() -> anyhow::Result<()> {
    const SHARED: [(&str, u16, &str); 2] =
        [("feature-store", 8085, "/features/"), ("analytics", 8084, "/api/analytics/user/")];
    let stack = Up::start(5_000, "group")?;
    let (broker, offset, locks) = (stack.broker.clone(), stack.offset, stack.locks.path().to_owned());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let ready = |port: u16| {
        let http = http.clone();
        async move {
            let r = http.get(format!("http://127.0.0.1:{port}/ready")).send().await.ok()?;
            r.status().is_success().then_some(())
        }
    };
    for port in [8081, 8083, 8084, 8085] {
        eventually(&format!("the service on {}", port + offset), Duration::from_secs(90), || ready(port + offset))
            .await?;
    }
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut extras = Vec::new();
    for (name, port, _) in SHARED {
        let child = extra_instance(name, &broker, port + offset + 1000, "group", &locks, &lines)?;
        extras.push(child);
        eventually(&format!("the extra {name}"), Duration::from_secs(90), || ready(port + offset + 1000)).await?;
    }

    let ingest = format!("http://127.0.0.1:{}/api/users/activity", 8081 + offset);
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    for round in 0..3 {
        for u in 0..USERS {
            let user = format!("group-{u}");
            let body = serde_json::json!({"eventId": format!("g{round}"), "userId": user,
                "eventType": "product_view", "productId": "P00042"});
            let r = http.post(&ingest).json(&body).send().await?;
            anyhow::ensure!(r.status().as_u16() == 202, "ingestion answered {}", r.status());
            *acked.entry(user).or_default() += 1;
        }
    }

    // Each user's views on exactly one instance of each service, counted once.
    let holders = |path: String, port: u16| {
        let http = http.clone();
        async move {
            let mut found = Vec::new();
            for k in 0..=1_usize {
                // A 404 (the user is not this instance's) has no counts.
                if let Some(views) = get_json(&http, port + offset + 1000 * k as u16, &path)
                    .await
                    .and_then(|v| v["counts"]["productViews"].as_u64())
                {
                    found.push((k, views));
                }
            }
            found
        }
    };
    let shared_once = |after_leaving: bool| {
        let (acked, holders) = (&acked, &holders);
        async move {
            // Per service, users held by each instance.
            let mut per_instance = [[0usize; 2]; SHARED.len()];
            for (user, n) in acked {
                for (s, (_, port, path)) in SHARED.iter().enumerate() {
                    let found = holders(format!("{path}{user}"), *port).await;
                    match found.as_slice() {
                        [(k, views)] if *views == *n => per_instance[s][*k] += 1,
                        other => {
                            eprintln!("{path}{user}: expected {n} views on one instance, found {other:?}");
                            return None;
                        }
                    }
                }
            }
            // While both run, both hold users; after the extras left, the first holds all.
            let sharing =
                |counts: &[usize; 2]| if after_leaving { counts[1] == 0 } else { counts.iter().all(|c| *c > 0) };
            per_instance.iter().all(sharing).then_some(per_instance)
        }
    };
    let shares = eventually("every user held by exactly one instance, counted once", Duration::from_secs(120), || {
        shared_once(false)
    })
    .await?;
    eprintln!("users per instance while both run (feature store, analytics): {shares:?}");

    for child in &mut extras {
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            kill(Pid::from_raw(pid), Signal::SIGTERM)?;
        }
        tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    }
    eventually("the first instances hold every user again, once", Duration::from_secs(120), || shared_once(true))
        .await?;

    stack.stop().await
}
