//! `retargetiq up`: the broker and the ten services as supervised child processes.
//!
//! Each child runs in its own process group, so a Ctrl-C in the terminal reaches only `up`,
//! which then stops things in order: the services first (SIGTERM; each drains its in-flight
//! work and commits its offsets), the broker last. A child that exits while `up` is running is
//! restarted with exponential backoff, like `restart: unless-stopped` in Compose — except one
//! that stopped on a setting it could not read ([`kit::service::CONFIGURATION_ERROR_EXIT`]):
//! restarting it would print the same error every 30 s, so `up` stops the stack and exits
//! with that code, the service's message naming the variable just above.
//!
//! The stream processors that only do throughput work ([`BACKGROUND`]) run at a lower CPU
//! priority (`--background-nice`, like `cpu_shares` in Compose): on a machine the whole stack
//! shares, a request to the ingestion or recommendation APIs, and the broker, get a core first
//! and the processors catch up with what is left. The work per event is the same; what changes
//! is who waits when the cores are busy (docs/operations.md).

use crate::{PORTS, port_of};
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::SERVICES;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the broker keeps its data (log files and SQLite), created if missing.
    #[arg(long, env = "RETARGETIQ_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Keep the broker's data in memory (lost on exit) instead.
    #[arg(long)]
    memory: bool,
    /// Where the embedded broker listens (ignored with KAFKA_BOOTSTRAP_SERVERS) [default:
    /// 127.0.0.1:9092, plus --port-offset].
    #[arg(long)]
    broker_listen: Option<SocketAddr>,
    /// Added to every service's contract port and to the default broker port (to run a second
    /// stack beside a first one; give it its own --data-dir, or --memory).
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// How long a service may take to drain on shutdown before it is killed.
    #[arg(long, default_value_t = 15)]
    grace_seconds: u64,
    /// Run each service from its own binary next to this one (`cargo build --release --bins`)
    /// instead of `retargetiq service <name>`: about half the memory per service, as in the
    /// Docker images.
    #[arg(long)]
    service_binaries: bool,
    /// Do not load the demo catalog (2,400 generated products) into an empty `catalog-topic`:
    /// for a shop that brings its own (`PUT /api/catalog/products`, `retargetiq catalog import`).
    #[arg(long)]
    no_demo_catalog: bool,
    /// How much lower the CPU priority (niceness, 0 to 19) of the background stream processors
    /// (event-processor, feature-store, retrieval, ranking, analytics) is than the broker's and
    /// the request-serving services': when the cores are busy, requests are served first. 0
    /// gives every process the same priority.
    #[arg(long, env = "RETARGETIQ_BACKGROUND_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    background_nice: i32,
}

/// The services whose work is throughput only (consuming and producing topics; their HTTP
/// endpoints are for inspection): [`UpArgs::background_nice`] lowers their priority. The
/// ingestion services, recommendation-api, rl-offer (it answers `POST /offer/select`) and the
/// UI serve requests and keep the broker's priority.
pub const BACKGROUND: [&str; 5] = ["event-processor", "feature-store", "retrieval", "ranking", "analytics"];

/// Lowers the CPU priority of every thread of the process group `pgid` (a child started with
/// `process_group(0)`) by `by` from ours, at most to 19.
fn lower_priority(name: &str, pgid: u32, by: i32) {
    let Some(pgid) = i32::try_from(pgid).ok().and_then(rustix::process::Pid::from_raw) else { return };
    let ours = rustix::process::getpriority_process(None).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_pgrp(Some(pgid), (ours + by).min(19)) {
        say(name, &format!("cannot lower its CPU priority: {e}"));
    }
}

/// Writes one line prefixed with the name of its source.
fn say(name: &str, line: &str) {
    const COLORS: [u8; 6] = [36, 32, 33, 35, 34, 31];
    if std::io::stdout().is_terminal() {
        let color = COLORS[name.bytes().map(usize::from).sum::<usize>() % COLORS.len()];
        println!("\x1b[{color}m{name:>18} |\x1b[0m {line}");
    } else {
        println!("{name:>18} | {line}");
    }
}

fn pipe(name: &'static str, out: Option<impl AsyncRead + Unpin + Send + 'static>) {
    if let Some(out) = out {
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                say(name, &line);
            }
        });
    }
}

/// A child process kept running until `stop`.
struct Supervised {
    name: &'static str,
    task: JoinHandle<()>,
}

/// How to start a child: the program, its arguments and environment, and how much lower its
/// CPU priority is than `up`'s.
struct Program {
    path: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    nice: i32,
}

/// Runs `program` as `name` until `stop`, restarting it when it exits; when it exits on a
/// configuration error, it is not restarted and `misconfigured` is cancelled.
fn supervise(
    name: &'static str,
    program: Program,
    stop: CancellationToken,
    misconfigured: CancellationToken,
    grace: Duration,
) -> anyhow::Result<Supervised> {
    let Program { path: program, args, env, nice } = program;
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            // The child ends with us even if we are killed with `kill -9` (it asks the kernel
            // to kill it when its parent thread dies: a runtime worker, alive as long as we are).
            let spawned = Command::new(&program)
                .args(&args)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env(kit::service::SUPERVISOR_PID_ENV, std::process::id().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true)
                .spawn();
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    say(name, &format!("cannot start: {e}"));
                    return;
                }
            };
            // Before its runtime starts threads, which inherit the priority of their creator.
            if let (Some(id), true) = (child.id(), nice > 0) {
                lower_priority(name, id, nice);
            }
            pipe(name, child.stdout.take());
            pipe(name, child.stderr.take());
            let started = Instant::now();
            tokio::select! {
                status = child.wait() => {
                    if stop.is_cancelled() {
                        return;
                    }
                    let code = kit::service::CONFIGURATION_ERROR_EXIT;
                    if status.as_ref().is_ok_and(|s| s.code() == Some(i32::from(code))) {
                        say(name, &format!("exited on a configuration error (exit status: {code}); not restarting it"));
                        misconfigured.cancel();
                        return;
                    }
                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                    say(name, &format!("exited ({status}); restarting in {}s", backoff.as_secs()));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                () = stop.cancelled() => {
                    if let Some(id) = child.id().and_then(|id| i32::try_from(id).ok()) {
                        let _ = kill(Pid::from_raw(id), Signal::SIGTERM);
                    }
                    match tokio::time::timeout(grace, child.wait()).await {
                        Ok(Ok(status)) if status.success() => {}
                        Ok(Ok(status)) => say(name, &format!("stopped ({status})")),
                        Ok(Err(e)) => say(name, &format!("stopped: {e}")),
                        Err(_) => {
                            say(name, &format!("did not stop within {}s; killing it", grace.as_secs()));
                            let _ = child.kill().await;
                        }
                    }
                    return;
                }
            }
        }
    });
    Ok(Supervised { name, task })
}

/// Checks that the ten service binaries next to `exe` are there and were built from the
/// sources as they are now: a binary older than a source file it was built from (by the
/// dep-info file cargo writes beside it, `<name>.d`) is one `cargo build` would rebuild, and a
/// stack or a benchmark run from it would mix old and new code without a word.
pub fn check_service_binaries(exe: &Path) -> anyhow::Result<()> {
    let missing: Vec<&str> = SERVICES.into_iter().filter(|name| !exe.with_file_name(name).is_file()).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "no {} next to {} (build them with `cargo build --release --bins`)",
        missing.join(", "),
        exe.display()
    );
    let stale: Vec<String> = SERVICES
        .into_iter()
        .filter_map(|name| {
            let source = newer_source(&exe.with_file_name(name))?;
            Some(format!("{name} (older than {})", source.display()))
        })
        .collect();
    anyhow::ensure!(
        stale.is_empty(),
        "out-of-date service binaries next to {}: {}; build every binary (`cargo build --release --locked`) first",
        exe.display(),
        stale.join(", ")
    );
    Ok(())
}

/// A source file that `binary` was built from and that changed after it was built, from the
/// dep-info file beside it (`<binary>.d`: `<binary>: <source> <source> ...`, spaces in paths
/// escaped). `None` when there is none, or no dep-info to tell (a binary installed or copied
/// into an image is taken as it is).
fn newer_source(binary: &Path) -> Option<PathBuf> {
    let built = binary.metadata().and_then(|m| m.modified()).ok()?;
    let mut dep_info = binary.as_os_str().to_owned();
    dep_info.push(".d");
    let text = std::fs::read_to_string(dep_info).ok()?;
    let (_, sources) = text.lines().next()?.split_once(": ")?;
    sources
        .replace("\\ ", "\0")
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(|s| PathBuf::from(s.replace('\0', " ")))
        .find(|source| source.metadata().and_then(|m| m.modified()).is_ok_and(|changed| changed > built))
}

/// The embedded broker's port when `--broker-listen` is not given, before the offset.
pub const BROKER_PORT: u16 = 9092;

/// The embedded broker's address: `--broker-listen`, or [`BROKER_PORT`] plus the offset on the
/// loopback interface. Fails when the offset moves a port past 65535.
fn broker_address(args: &UpArgs) -> anyhow::Result<SocketAddr> {
    let highest = PORTS.iter().map(|(_, port)| *port).chain([BROKER_PORT]).max().unwrap_or(BROKER_PORT);
    anyhow::ensure!(
        highest.checked_add(args.port_offset).is_some(),
        "--port-offset {} moves port {highest} past 65535",
        args.port_offset
    );
    Ok(args.broker_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], BROKER_PORT + args.port_offset))))
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let broker_listen = broker_address(&args)?;
    let exe = std::env::current_exe().context("locating the retargetiq executable")?;
    if args.service_binaries {
        check_service_binaries(&exe).context("--service-binaries")?;
    }
    let shutdown = kit::service::shutdown_on_signal();
    let grace = Duration::from_secs(args.grace_seconds);
    let external = std::env::var("KAFKA_BOOTSTRAP_SERVERS").ok().filter(|s| !s.trim().is_empty());

    let broker_stop = CancellationToken::new();
    // Cancelled when a child stopped on a setting it could not read: the stack stops.
    let misconfigured = CancellationToken::new();
    let (bootstrap, broker) = match external {
        Some(b) => {
            say("up", &format!("using the broker at {b} (KAFKA_BOOTSTRAP_SERVERS)"));
            (b, None)
        }
        None => {
            let addr = broker_listen;
            anyhow::ensure!(
                std::net::TcpListener::bind(addr).is_ok(),
                "{addr} is in use: stop what listens there, or set KAFKA_BOOTSTRAP_SERVERS to use that broker"
            );
            let mut broker_args = vec!["broker".to_owned(), "--listen".to_owned(), addr.to_string()];
            if args.memory {
                broker_args.push("--memory".to_owned());
                say("up", &format!("starting the embedded broker on {addr} (in memory)"));
            } else {
                std::fs::create_dir_all(&args.data_dir)
                    .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
                let dir = std::fs::canonicalize(&args.data_dir)?.join("broker");
                say("up", &format!("starting the embedded broker on {addr} (data in {})", dir.display()));
                broker_args.extend(["--data-dir".to_owned(), dir.display().to_string()]);
            }
            let program = Program { path: exe.clone(), args: broker_args, env: Vec::new(), nice: 0 };
            let child = supervise("broker", program, broker_stop.clone(), misconfigured.clone(), grace)?;
            tokio::select! {
                r = broker::wait_for_port(addr, Duration::from_secs(60)) => r?,
                () = shutdown.cancelled() => anyhow::bail!("interrupted while the broker was starting"),
                () = misconfigured.cancelled() => {
                    return Err(anyhow::Error::new(Misconfigured).context("the broker stopped on a configuration error"));
                }
            }
            (addr.to_string(), Some(child))
        }
    };

    let result = async {
        kit::kafka::admin::ensure_topics(&bootstrap, 1, Duration::from_secs(60)).await?;
        say("up", "topics ready");
        if !args.no_demo_catalog {
            let settings = if broker.is_some() {
                kit::kafka::KafkaSettings::for_embedded_broker(bootstrap.clone())
            } else {
                kit::kafka::KafkaSettings::for_broker(bootstrap.clone())
            };
            match kit::catalog::load_demo_if_empty(&settings).await? {
                0 => say("up", "catalog-topic already holds a catalog"),
                n => say("up", &format!("loaded the demo catalog ({n} products) into the empty catalog-topic")),
            }
        }
        let services_stop = CancellationToken::new();
        let mut children = Vec::new();
        let offset = args.port_offset;
        for name in SERVICES {
            let mut env = vec![("KAFKA_BOOTSTRAP_SERVERS".to_owned(), bootstrap.clone())];
            if broker.is_some() {
                env.extend(kit::kafka::EMBEDDED_BROKER_ENV.map(|(k, v)| (k.to_owned(), v.to_owned())));
            }
            if offset != 0 {
                env.push(("HTTP_PORT".to_owned(), (port_of(name) + offset).to_string()));
                if name == "frontend-ui" {
                    for (service, port) in PORTS.iter().filter(|(s, _)| *s != "frontend-ui") {
                        let var = format!("{}_URL", service.to_uppercase().replace('-', "_"));
                        env.push((var, format!("http://127.0.0.1:{}", port + offset)));
                    }
                }
            }
            if std::io::stdout().is_terminal() {
                env.push(("CLICOLOR_FORCE".to_owned(), "1".to_owned()));
            }
            let nice = if BACKGROUND.contains(&name) { args.background_nice } else { 0 };
            let (path, args) = if args.service_binaries {
                (exe.with_file_name(name), vec![])
            } else {
                (exe.clone(), vec!["service".into(), name.into()])
            };
            let program = Program { path, args, env, nice };
            children.push(supervise(name, program, services_stop.clone(), misconfigured.clone(), grace)?);
        }
        let announce = tokio::spawn(announce_ready(shutdown.clone(), offset));
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = misconfigured.cancelled() => {}
        }
        announce.abort();
        say("up", "stopping the services");
        services_stop.cancel();
        for child in children {
            let _ = child.task.await;
            tracing::debug!(service = child.name, "stopped");
        }
        anyhow::Ok(())
    }
    .await;

    if let Some(broker) = broker {
        say("up", "stopping the broker");
        broker_stop.cancel();
        let _ = broker.task.await;
    }
    say("up", "stopped");
    result?;
    if misconfigured.is_cancelled() {
        return Err(Misconfigured.into());
    }
    Ok(())
}

/// `up` stopped because a child (a service, or the broker) stopped on a configuration error;
/// `up` exits with the same code.
#[derive(Debug)]
pub struct Misconfigured;

impl std::fmt::Display for Misconfigured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "stopped: a process cannot run with its configuration (its message above says why); fix it and start again",
        )
    }
}

impl std::error::Error for Misconfigured {}

/// How long `up` waits for every service to be ready before it says which are not yet.
const READY_PATIENCE: Duration = Duration::from_secs(120);

/// Says once when every service answers `/ready`; if that takes longer than
/// [`READY_PATIENCE`] (a service rebuilding its state from a long history), says which are
/// still starting, and then still says when they all are ready.
async fn announce_ready(shutdown: CancellationToken, offset: u16) {
    let ports: Vec<(&str, u16)> = PORTS.iter().map(|(name, port)| (*name, port + offset)).collect();
    let late = |waiting: &[&str]| {
        let after = READY_PATIENCE.as_secs();
        say("up", &format!("still not ready after {after}s: {} (still waiting)", waiting.join(", ")));
    };
    let Some(elapsed) = await_ready(&ports, READY_PATIENCE, &shutdown, late).await else { return };
    say(
        "up",
        &format!(
            "all ten services ready after {:.1}s: UI at http://localhost:{}, recommendations at http://localhost:{}/recommend/user-0001",
            elapsed.as_secs_f64(),
            3000 + offset,
            8089 + offset
        ),
    );
}

/// Waits until every service of `ports` (name, port) answers `GET /ready` with a success, and
/// returns how long that took; `None` if shut down first. Once `patience` has passed, calls
/// `late` (once) with those not ready yet.
async fn await_ready(
    ports: &[(&str, u16)],
    patience: Duration,
    shutdown: &CancellationToken,
    late: impl FnOnce(&[&str]),
) -> Option<Duration> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().ok()?;
    let started = Instant::now();
    let mut late = Some(late);
    loop {
        let mut waiting = Vec::new();
        for (name, port) in ports {
            let ok =
                http.get(format!("http://127.0.0.1:{port}/ready")).send().await.is_ok_and(|r| r.status().is_success());
            if !ok {
                waiting.push(*name);
            }
        }
        if waiting.is_empty() {
            return Some(started.elapsed());
        }
        if started.elapsed() > patience
            && let Some(late) = late.take()
        {
            late(&waiting);
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{proc_stat, stat_field};

    /// A service that becomes ready only after the patience ran out is still waited for: the
    /// late notice names it once, and the wait ends when it answers (`up` used to give up
    /// after two minutes and never say that the stack was ready).
    #[tokio::test]
    async fn readiness_is_awaited_past_the_patience() -> anyhow::Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let serve = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            let app = axum::Router::new().route("/ready", axum::routing::get(|| async { "ready" }));
            axum::serve(tokio::net::TcpListener::bind(("127.0.0.1", port)).await?, app).await?;
            anyhow::Ok(())
        });
        let mut told = Vec::new();
        let patience = Duration::from_millis(300);
        let (ports, shutdown) = ([("slow", port)], CancellationToken::new());
        let waited = await_ready(&ports, patience, &shutdown, |w| told.push(w.join(",")));
        let elapsed = tokio::time::timeout(Duration::from_secs(20), waited).await?.expect("not shut down");
        serve.abort();
        assert_eq!(told, ["slow"]);
        assert!(elapsed >= Duration::from_millis(1_500), "{elapsed:?}");
        Ok(())
    }

    /// `up`'s arguments as the command line gives them.
    fn up_args(args: &[&str]) -> UpArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("up").chain(args.iter().copied())).expect("parses").up
    }

    /// The broker's port follows the offset unless given; an offset that moves a port past
    /// 65535 is refused rather than wrapped around.
    #[test]
    fn the_broker_port_follows_the_offset() -> anyhow::Result<()> {
        assert_eq!(broker_address(&up_args(&[]))?, "127.0.0.1:9092".parse()?);
        assert_eq!(broker_address(&up_args(&["--port-offset", "1000"]))?, "127.0.0.1:10092".parse()?);
        let given = ["--port-offset", "1000", "--broker-listen", "0.0.0.0:7000"];
        assert_eq!(broker_address(&up_args(&given))?, "0.0.0.0:7000".parse()?);
        let refused = broker_address(&up_args(&["--port-offset", "60000"])).expect_err("past 65535");
        assert_eq!(refused.to_string(), "--port-offset 60000 moves port 9092 past 65535");
        Ok(())
    }

    /// Ten fake service binaries in `dir` next to a fake `retargetiq`, each with cargo's
    /// dep-info naming `sources`; returns the path of the fake `retargetiq`.
    fn fake_build(dir: &Path, sources: &[&Path]) -> anyhow::Result<PathBuf> {
        let escaped: Vec<String> = sources.iter().map(|s| s.display().to_string().replace(' ', "\\ ")).collect();
        for name in SERVICES {
            let binary = dir.join(name);
            std::fs::write(&binary, "binary")?;
            std::fs::write(dir.join(format!("{name}.d")), format!("{}: {}\n", binary.display(), escaped.join(" ")))?;
        }
        Ok(dir.join("retargetiq"))
    }

    fn set_modified(path: &Path, at: std::time::SystemTime) -> anyhow::Result<()> {
        Ok(std::fs::File::options().write(true).open(path)?.set_modified(at)?)
    }

    #[test]
    fn service_binaries_older_than_their_sources_are_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (a, b) = (dir.path().join("a.rs"), dir.path().join("with space.rs"));
        std::fs::write(&a, "")?;
        std::fs::write(&b, "")?;
        let exe = fake_build(dir.path(), &[&a, &b])?;
        let now = std::time::SystemTime::now();
        let hour = Duration::from_secs(3600);
        for path in [&a, &b] {
            set_modified(path, now - 2 * hour)?;
        }
        for name in SERVICES {
            set_modified(&exe.with_file_name(name), now - hour)?;
        }
        check_service_binaries(&exe).expect("every binary built after its sources");

        // One source, whose path has a space, changed after the binaries were built.
        set_modified(&b, now)?;
        let e = check_service_binaries(&exe).expect_err("built before a source changed").to_string();
        assert!(e.contains("out-of-date service binaries"), "{e}");
        assert!(e.contains(&format!("feature-store (older than {})", b.display())), "{e}");
        assert!(e.contains("cargo build --release --locked"), "{e}");

        // A binary without dep-info (installed, copied into an image) is taken as it is.
        for name in SERVICES {
            std::fs::remove_file(dir.path().join(format!("{name}.d")))?;
        }
        check_service_binaries(&exe).expect("nothing says what they were built from");

        std::fs::remove_file(exe.with_file_name("ranking"))?;
        let e = check_service_binaries(&exe).expect_err("a binary missing").to_string();
        assert!(e.starts_with("no ranking next to "), "{e}");
        Ok(())
    }

    /// The niceness of every thread of `pid`.
    fn thread_niceness(pid: u32) -> anyhow::Result<Vec<i32>> {
        let mut niceness = Vec::new();
        for thread in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = proc_stat(&thread?.path().join("stat").to_string_lossy()).context("no stat")?;
            niceness.push(stat[stat_field::NICENESS].parse()?);
        }
        Ok(niceness)
    }

    #[tokio::test]
    async fn a_background_service_runs_at_a_lower_priority_in_every_process_of_its_group() -> anyhow::Result<()> {
        let ours = rustix::process::getpriority_process(None)?;
        // A child in its own process group, with processes of its own started before the call
        // (a shell running a pipeline of two sleeps).
        let mut child =
            Command::new("sh").args(["-c", "sleep 30 | sleep 30"]).process_group(0).kill_on_drop(true).spawn()?;
        let pid = child.id().context("no pid")?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut members = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let Some(p) = entry?.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if proc_stat(&format!("/proc/{p}/stat")).is_some_and(|f| f[stat_field::PROCESS_GROUP] == pid.to_string()) {
                members.push(p);
            }
        }
        assert!(members.len() >= 3, "the shell and its two sleeps share the group: {members:?}");
        for p in &members {
            assert!(thread_niceness(*p)?.iter().all(|&n| n == ours), "process {p} starts at our priority");
        }

        lower_priority("test", pid, 10);
        for p in &members {
            assert_eq!(thread_niceness(*p)?, vec![(ours + 10).min(19)], "process {p}");
        }
        child.kill().await?;
        Ok(())
    }
}
