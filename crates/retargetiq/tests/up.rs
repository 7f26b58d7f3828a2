//! `retargetiq up` as a user runs it: the real binary starts a durable broker and the ten
//! services as child processes, prefixes their output, serves traffic, and stops cleanly on
//! SIGTERM, leaving the broker's data on disk.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{eventually, free_port};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

const VIEW: &str = r#"{"eventId":"up-view-1","userId":"up-test","eventType":"product_view","productId":"P00042"}"#;

/// GETs `path` on `127.0.0.1:port` as JSON; `None` on any failure (for polling).
async fn get_json(http: &reqwest::Client, port: u16, path: &str) -> Option<serde_json::Value> {
    http.get(format!("http://127.0.0.1:{port}{path}")).send().await.ok()?.json().await.ok()
}

/// `up` with only a port offset: the broker's port moves with the services' (9092 + offset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_the_platform_and_stops_cleanly() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    // Ports are the contract ports plus an offset, so a stack already running is not disturbed;
    // the broker's too (9092 + offset), as no --broker-listen is given.
    let offset = testkit::stack_port_offset(9092 - 8089)?;
    let broker = std::net::SocketAddr::from(([127, 0, 0, 1], 9092 + offset));
    let mut child = Command::new(env!("CARGO_BIN_EXE_retargetiq"))
        .args(["up", "--port-offset", &offset.to_string()])
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let sink = Arc::clone(&lines);
    let reader = tokio::spawn(async move {
        let mut out = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = out.next_line().await {
            sink.lock().expect("lock").push(line);
        }
    });
    let has = |needle: &'static str| {
        let lines = Arc::clone(&lines);
        move || {
            let found = lines.lock().expect("lock").iter().any(|l| l.contains(needle));
            async move { found.then_some(()) }
        }
    };

    eventually("all services ready", Duration::from_secs(90), has("all ten services ready")).await?;
    let starting = format!("starting the embedded broker on {broker}");
    assert!(lines.lock().expect("lock").iter().any(|l| l.contains(&starting)), "no line {starting:?}");
    assert!(tokio::net::TcpStream::connect(broker).await.is_ok(), "the broker listens on {broker}");
    let http = reqwest::Client::new();
    let resp = http.post(format!("http://127.0.0.1:{}/api/users/activity", 8081 + offset)).body(VIEW).send().await?;
    assert_eq!(resp.status().as_u16(), 202);
    let recommended = eventually("recommendations for the viewer", Duration::from_secs(30), || {
        let http = http.clone();
        async move {
            let r = get_json(&http, 8089 + offset, "/recommend/up-test").await?;
            (r["coldStart"] == false).then_some(r)
        }
    })
    .await?;
    assert_eq!(recommended["recommendations"][0]["itemId"], "P00042", "{recommended}");
    let ui = http.get(format!("http://127.0.0.1:{}/", 3000 + offset)).send().await?;
    assert_eq!(ui.status().as_u16(), 200);

    // kill -9 the stateful services: `up` restarts them, they rebuild their state from Kafka
    // and resume from their committed offsets. The view is posted again (a client retry with
    // the same eventId): the restored processor recognises it, so every accepted event is
    // counted exactly once, and what was known before the crash is known after it.
    let up_pid = child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    tokio::time::sleep(Duration::from_millis(1500)).await; // let auto-commit (1 s) record the offsets
    let mut killed = Vec::new();
    for service in ["event-processor", "analytics", "feature-store"] {
        let victim = retargetiq::child_process(up_pid, service).ok_or_else(|| anyhow::anyhow!("no {service} child"))?;
        kill(Pid::from_raw(victim), Signal::SIGKILL)?;
        killed.push((service, victim));
    }
    for body in [VIEW, r#"{"userId":"up-test","eventType":"add_to_cart","productId":"P00042"}"#] {
        let resp =
            http.post(format!("http://127.0.0.1:{}/api/users/activity", 8081 + offset)).body(body).send().await?;
        assert_eq!(resp.status().as_u16(), 202);
    }
    eventually("both events counted after the restart", Duration::from_secs(60), || {
        let http = http.clone();
        async move {
            let u = get_json(&http, 8084 + offset, "/api/analytics/user/up-test").await?;
            (u["counts"]["addToCart"] == 1).then_some(u)
        }
    })
    .await
    .map(|u| assert_eq!(u["counts"]["productViews"], 1, "counted once: {u}"))?;
    // The restarted processor itself recognised the retried view (analytics would also drop
    // it, by event id: two layers of de-duplication).
    let stats = get_json(&http, 8083 + offset, "/api/processor/stats")
        .await
        .ok_or_else(|| anyhow::anyhow!("no answer from /api/processor/stats"))?;
    assert_eq!(stats["duplicates"], 1, "the processor's memory of event ids survived the crash: {stats}");
    for (service, victim) in killed {
        assert_ne!(retargetiq::child_process(up_pid, service), Some(victim), "a new {service} runs");
    }
    let features = eventually("the restored features with the cart", Duration::from_secs(30), || {
        let http = http.clone();
        async move {
            let f = get_json(&http, 8085 + offset, "/features/up-test").await?;
            (f["cart"] == serde_json::json!(["P00042"])).then_some(f)
        }
    })
    .await?;
    assert_eq!(features["counts"]["productViews"], 1, "the view from before the crash, once: {features}");

    // Simulated shoppers: every accepted event is counted exactly once.
    let before = get_json(&http, 8084 + offset, "/api/analytics/summary")
        .await
        .ok_or_else(|| anyhow::anyhow!("no answer from /api/analytics/summary"))?;
    let base = |port: u16| reqwest::Url::parse(&format!("http://127.0.0.1:{}", port + offset));
    let summary = retargetiq::simulate::run(retargetiq::simulate::SimulateArgs {
        rate: 50.0,
        duration: Duration::from_secs(2),
        shoppers: 20,
        prefix: "sim".into(),
        seed: Some(1),
        concurrency: 8,
        activity_url: base(8081)?,
        order_url: base(8082)?,
        truth: None,
        quiet: true,
    })
    .await?;
    assert!(summary.accepted >= 50 && summary.rejected == 0 && summary.failed == 0, "{}", summary.report());
    let expected = before["events"].as_u64().unwrap_or(0) + summary.accepted;
    eventually("every simulated event counted", Duration::from_secs(30), || {
        let http = http.clone();
        async move {
            let s = get_json(&http, 8084 + offset, "/api/analytics/summary").await?;
            (s["events"].as_u64() == Some(expected)).then_some(())
        }
    })
    .await?;

    kill(Pid::from_raw(i32::try_from(up_pid)?), Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    reader.await?;
    let lines = lines.lock().expect("lock").clone();
    assert!(status.success(), "up exited with {status}: {lines:#?}");
    for service in ["user-activity |", "event-processor |", "frontend-ui |", "broker |"] {
        assert!(lines.iter().any(|l| l.trim_start().starts_with(service)), "no line prefixed {service:?}");
    }
    let stopping_broker = lines.iter().position(|l| l.contains("stopping the broker")).expect("the broker is stopped");
    let last_service_stop =
        lines.iter().rposition(|l| l.contains("stopped") && l.contains("service=")).expect("services stop");
    assert!(last_service_stop < stopping_broker, "services stop before the broker");
    assert!(data.path().join("broker").join("tansu.db").exists(), "the broker's data stays on disk");
    Ok(())
}

/// `up` killed with `kill -9` cannot stop its children itself: they end with it anyway (each
/// asked the kernel to kill it when its parent dies), instead of living on holding the ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_up_takes_its_children_with_it() -> anyhow::Result<()> {
    let broker_port = free_port()?;
    let offset = testkit::stack_port_offset(1)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_retargetiq"))
        .args(["up", "--memory", "--broker-listen", &format!("127.0.0.1:{broker_port}")])
        .args(["--port-offset", &offset.to_string()])
        .env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let ready = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&ready);
    let _reader = tokio::spawn(async move {
        let mut out = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = out.next_line().await {
            if line.contains("all ten services ready") {
                *flag.lock().expect("lock") = true;
            }
        }
    });
    eventually("all services ready", Duration::from_secs(90), || {
        let ready = *ready.lock().expect("lock");
        async move { ready.then_some(()) }
    })
    .await?;
    let up_pid = child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let children: Vec<u32> = retargetiq::child_processes(up_pid).into_iter().map(|(pid, _)| pid).collect();
    assert_eq!(children.len(), 11, "the broker and ten services");
    kill(Pid::from_raw(i32::try_from(up_pid)?), Signal::SIGKILL)?;
    child.wait().await?;
    // Running, not a zombie waiting for whoever adopted it to reap it.
    let running = |pid: &u32| {
        retargetiq::proc_stat(&format!("/proc/{pid}/stat")).is_some_and(|f| f.first().is_some_and(|state| state != "Z"))
    };
    let alive = || children.iter().copied().filter(running);
    eventually("every child gone with up", Duration::from_secs(30), || {
        let left: Vec<u32> = alive().collect();
        async move { left.is_empty().then_some(()) }
    })
    .await
    .map_err(|e| {
        let left: Vec<String> = alive()
            .map(|pid| {
                let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                format!("{pid}: {}", cmd.replace('\0', " "))
            })
            .collect();
        e.context(format!("still running: {left:?}"))
    })?;
    Ok(())
}

/// `up --service-binaries`, and a benchmark (which runs the services' own binaries when they
/// are there), stop at once and say which binaries are older than a source they were built
/// from (cargo's dep-info beside each), rather than running a stack of old services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_date_service_binaries_are_refused() -> anyhow::Result<()> {
    // Next to a hard link to the real binary (its own path is where it looks for the others).
    let dir = tempfile::Builder::new().tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let exe = dir.path().join("retargetiq");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_retargetiq"), &exe).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_retargetiq"), &exe)?;
    }
    let source = dir.path().join("lib.rs");
    for name in retargetiq::SERVICES {
        let binary = dir.path().join(name);
        std::fs::write(&binary, "#!/bin/sh\nsleep 600\n")?;
        std::fs::write(dir.path().join(format!("{name}.d")), format!("{}: {}\n", binary.display(), source.display()))?;
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options().write(true).open(&binary)?.set_modified(an_hour_ago)?;
    }
    std::fs::write(&source, "// changed after the binaries were built\n")?;

    let broker = format!("127.0.0.1:{}", free_port()?);
    let offset = testkit::stack_port_offset(0)?.to_string();
    let runs: [&[&str]; 2] = [
        &["up", "--service-binaries", "--memory", "--broker-listen", &broker, "--port-offset", &offset],
        &["bench", "soak", "--duration", "1s", "--port-offset", &offset],
    ];
    for args in runs {
        let run = Command::new(&exe)
            .args(args)
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .map_err(|_| anyhow::anyhow!("{args:?} ran on with out-of-date service binaries"))??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("out-of-date service binaries"), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("feature-store (older than {})", source.display())), "{args:?}: {stderr}");
    }
    Ok(())
}

/// Runs `up` (its other arguments given) on a broker port and port offset of its own until it
/// exits, which it must within a minute (else fails saying `ran_on`), with the
/// configuration-error code; returns its stdout and stderr.
async fn stopped_on_configuration(mut up: Command, ran_on: &str) -> anyhow::Result<(String, String)> {
    let broker = format!("127.0.0.1:{}", free_port()?);
    let offset = testkit::stack_port_offset(0)?.to_string();
    let run = up
        .args(["--broker-listen", &broker, "--port-offset", &offset])
        .env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.map_err(|_| anyhow::anyhow!("{ran_on}"))??;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(i32::from(kit::service::CONFIGURATION_ERROR_EXIT)), "{stdout}\n{stderr}");
    Ok((stdout.into_owned(), stderr.into_owned()))
}

/// A service that stops on a setting it cannot read is not restarted every 30 s printing the
/// same error: `up` stops the stack and exits with the service's configuration-error code,
/// the service's message naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_a_service_cannot_read_stops_up() -> anyhow::Result<()> {
    let mut up = Command::new(env!("CARGO_BIN_EXE_retargetiq"));
    up.args(["up", "--memory"]).env("OFFER_EPSILON", "lots");
    let (stdout, stderr) = stopped_on_configuration(up, "up ran on with a service that cannot start").await?;
    assert!(stdout.contains("rl-offer: configuration error") && stdout.contains("OFFER_EPSILON"), "{stdout}");
    assert!(stdout.contains("not restarting it"), "{stdout}");
    assert!(!stdout.contains("restarting in"), "nothing is restarted: {stdout}");
    assert!(stdout.contains("stopping the broker"), "the stack is stopped: {stdout}");
    assert!(stderr.contains("fix it and start again"), "{stderr}");
    Ok(())
}

/// A second stack started on the data directory of a running one (say with only its ports
/// moved) is refused: two brokers on the same files would hand out the same offsets twice.
/// `up` stops with the configuration-error code, naming the broker that holds the data, and
/// the first broker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stack_on_the_same_data_is_refused() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let first = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut holder = Command::new(env!("CARGO_BIN_EXE_retargetiq"))
        .args(["broker", "--listen", &first.to_string(), "--data-dir"])
        .arg(data.path().join("broker"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    broker::wait_for_port(first, Duration::from_secs(30)).await?;

    let mut up = Command::new(env!("CARGO_BIN_EXE_retargetiq"));
    up.args(["up", "--data-dir"]).arg(data.path());
    let (stdout, stderr) = stopped_on_configuration(up, "a second stack ran on the data of the first").await?;
    let pid = holder.id().ok_or_else(|| anyhow::anyhow!("the first broker is gone"))?;
    assert!(stdout.contains(&format!("in use by another broker (process {pid})")), "{stdout}");
    assert!(stdout.contains("not restarting it"), "{stdout}");
    assert!(stderr.contains("fix it and start again"), "{stderr}");
    assert!(holder.try_wait()?.is_none(), "the first broker still runs");
    assert!(tokio::net::TcpStream::connect(first).await.is_ok(), "the first broker still serves");
    Ok(())
}
