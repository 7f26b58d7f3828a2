//! The shape every service shares: [`Service`] says what is particular to a service,
//! [`main`] does the rest — telemetry, configuration (a bad value exits with code 2, naming
//! the variable), binding the port, running until SIGINT/SIGTERM, and draining in-flight
//! work within `SHUTDOWN_TIMEOUT_MS`.
//!
//! A consumer or background task that fails or panics is never restarted inside the process
//! (its handler's state would be replayed into itself): the service turns not ready, drains
//! and ends with an error, and `main` exits non-zero so that its supervisor (`retargetiq up`,
//! Compose, Kubernetes) starts it afresh, rebuilding its state from Kafka.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt as _;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::{ConfigError, Env};
use crate::http::{self, Cors, Health, ReadyFlag};
use crate::kafka::consumer::ConsumerEnv;
use crate::kafka::{ConsumerSpec, Handler, KafkaSettings, Producer, run_consumer};
use crate::telemetry::{self, LogFormat};

/// What is particular to one service.
pub trait Service {
    /// The binary name, as in the contract (`user-activity`, ...).
    const NAME: &'static str;
    /// The contract port.
    const DEFAULT_PORT: u16;
    /// Whether the service's instances share partitions (and so must not both read the same
    /// share): such an instance holds a lock on its share while it runs (see [`standby`]).
    const PARTITIONED: bool = false;
    /// The service's own settings.
    type Config: Send + 'static;

    fn config(env: &Env) -> Result<Self::Config, ConfigError>;

    /// Runs the service until `ctx.shutdown` is cancelled.
    fn run(config: Self::Config, ctx: Context) -> impl Future<Output = anyhow::Result<()>> + Send + 'static;
}

/// Settings every service has.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub kafka: KafkaSettings,
    /// `HTTP_HOST` (default `0.0.0.0`) and `HTTP_PORT` (default: the contract port).
    pub http_addr: SocketAddr,
    /// `LOG_FORMAT`: `text` (default) or `json`.
    pub log_format: LogFormat,
    /// `SHUTDOWN_TIMEOUT_MS`: how long draining may take after SIGTERM (default 10000).
    pub shutdown_timeout: Duration,
    /// `CORS_ALLOWED_ORIGINS`: which web pages may call the service from a browser.
    pub cors: Cors,
}

impl CommonConfig {
    pub fn from_env(env: &Env, default_port: u16) -> Result<Self, ConfigError> {
        let host: std::net::IpAddr = env.get("HTTP_HOST", std::net::IpAddr::from([0, 0, 0, 0]))?;
        let port: u16 = env.get("HTTP_PORT", default_port)?;
        let max_users: usize = env.checked("MAX_USERS", crate::state::DEFAULT_MAX_USERS, crate::config::positive)?;
        if let Some(n) = std::num::NonZeroUsize::new(max_users) {
            crate::state::set_max_users(n);
        }
        Ok(Self {
            kafka: KafkaSettings::from_env(env)?,
            http_addr: SocketAddr::new(host, port),
            log_format: env.get("LOG_FORMAT", LogFormat::Text)?,
            shutdown_timeout: env.millis("SHUTDOWN_TIMEOUT_MS", Duration::from_secs(10))?,
            cors: Cors::from_env(env)?,
        })
    }
}

/// What a running service is given, and the helpers it builds itself with.
pub struct Context {
    pub service: &'static str,
    pub kafka: KafkaSettings,
    /// Cancelled on shutdown, or when a consumer or task of this service failed.
    pub shutdown: CancellationToken,
    pub health: Health,
    cors: Cors,
    listener: TcpListener,
    tasks: Vec<JoinHandle<()>>,
    producers: Vec<Producer>,
    /// The first failure of a consumer or task: the service ends with it.
    failure: Arc<Mutex<Option<String>>>,
    /// The `alive` readiness condition: false once a consumer or task has failed.
    alive: ReadyFlag,
}

impl Context {
    pub fn new(
        service: &'static str,
        kafka: KafkaSettings,
        cors: Cors,
        listener: TcpListener,
        shutdown: &CancellationToken,
    ) -> Self {
        let health = Health::default();
        let alive = health.condition("alive");
        alive.set(true);
        Self {
            service,
            kafka,
            // A token of its own, so that a failure stops this service and not its siblings
            // (in tests, several services share one process and one shutdown).
            shutdown: shutdown.child_token(),
            health,
            cors,
            listener,
            tasks: Vec::new(),
            producers: Vec::new(),
            failure: Arc::default(),
            alive,
        }
    }

    /// Runs `task` as part of the service: an error or a panic before shutdown makes the
    /// service not ready and stops it with that failure.
    fn supervise<F>(&mut self, what: String, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (failure, shutdown, alive) = (Arc::clone(&self.failure), self.shutdown.clone(), self.alive.clone());
        self.tasks.push(crate::spawn(async move {
            let outcome = match AssertUnwindSafe(task).catch_unwind().await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("{what} failed: {e:#}"),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".to_owned());
                    format!("{what} panicked: {message}")
                }
            };
            alive.set(false);
            if shutdown.is_cancelled() {
                // Stopping anyway: a task cut short by the shutdown is no failure.
                tracing::warn!(error = %outcome, "ended during shutdown");
                return;
            }
            tracing::error!(error = %outcome, "fatal: stopping the service so that its supervisor restarts it");
            failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(outcome);
            shutdown.cancel();
        }));
    }

    /// The address the service listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A producer for request paths (deliveries fail after `KAFKA_DELIVERY_TIMEOUT_MS`), with
    /// a `kafka` readiness condition kept up to date by probing the broker.
    pub fn request_producer(&mut self) -> anyhow::Result<Producer> {
        let p = Producer::for_requests(&self.kafka)?;
        self.watch_broker(&p);
        Ok(p)
    }

    /// A producer for pipelines (retries until delivered), with a `kafka` readiness condition.
    pub fn pipeline_producer(&mut self) -> anyhow::Result<Producer> {
        let p = Producer::for_pipeline(&self.kafka)?;
        self.watch_broker(&p);
        Ok(p)
    }

    fn watch_broker(&mut self, producer: &Producer) {
        let name =
            if self.producers.is_empty() { "kafka".to_owned() } else { format!("kafka-{}", self.producers.len() + 1) };
        let flag = self.health.condition(name);
        let producer = producer.clone();
        let shutdown = self.shutdown.clone();
        self.producers.push(producer.clone());
        crate::spawn(async move {
            // A broker busy under load may take seconds to answer a metadata request while it
            // still takes every message: only two probes in a row that get no answer within 5 s
            // each (and no acknowledgement meanwhile) make it unreachable. Ingestion answers
            // 503 at once while it is, so a hasty verdict would refuse traffic the broker takes.
            let mut watch = BrokerWatch::new(producer.acknowledged());
            loop {
                let answered = producer.probe(Duration::from_secs(5)).await;
                let ok = watch.observe(answered, producer.acknowledged());
                if ok != flag.get() {
                    if ok {
                        tracing::info!("broker reachable");
                    } else {
                        tracing::warn!("broker unreachable");
                    }
                }
                producer.set_connected(ok);
                flag.set(ok);
                let pause = if ok { Duration::from_secs(3) } else { Duration::from_millis(500) };
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        });
    }

    /// A readiness condition of the service's own (for example "view restored").
    pub fn condition(&self, name: &str) -> ReadyFlag {
        self.health.condition(name)
    }

    /// Starts an at-least-once consumer; [`Context::serve`] waits for it on shutdown.
    pub fn spawn_consumer<H: Handler>(&mut self, producer: &Producer, spec: ConsumerSpec, handler: H) {
        self.spawn_consumer_flag(producer, spec, handler);
    }

    /// [`Context::spawn_consumer`], returning the consumer's readiness condition (a replica is
    /// ready once caught up).
    pub fn spawn_consumer_flag<H: Handler>(
        &mut self,
        producer: &Producer,
        spec: ConsumerSpec,
        handler: H,
    ) -> ReadyFlag {
        let ready = self.health.condition(format!("consumer:{}", spec.name));
        let env = ConsumerEnv {
            settings: self.kafka.clone(),
            service: self.service,
            producer: producer.clone(),
            shutdown: self.shutdown.clone(),
            ready: ready.clone(),
        };
        self.supervise(format!("consumer {}", spec.name), run_consumer(env, spec, handler));
        ready
    }

    /// Starts a background task of the service's own that ends on shutdown.
    pub fn spawn_task<F>(&mut self, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let n = self.tasks.len();
        self.supervise(format!("task {n}"), task);
    }

    /// Serves `routes` (plus the ops routes) until shutdown, then waits for the consumers
    /// and tasks to drain and flushes the producers.
    pub async fn serve(self, routes: Router) -> anyhow::Result<()> {
        let app = http::app(self.service, self.health.clone(), &self.cors, routes);
        let served = http::serve(self.listener, app, self.shutdown.clone()).await;
        // The server only returns on shutdown or a fatal error: stop everything either way.
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        for p in self.producers {
            p.flush(Duration::from_secs(5)).await;
        }
        if let Some(failure) = self.failure.lock().unwrap_or_else(PoisonError::into_inner).take() {
            anyhow::bail!(failure);
        }
        served
    }
}

/// Starts a service on `listener` inside its `service` span, answering browsers as `cors`
/// says; the handle ends when it has drained after `shutdown`.
pub fn start<S: Service>(
    config: S::Config,
    kafka: KafkaSettings,
    cors: Cors,
    listener: TcpListener,
    shutdown: &CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    let span = tracing::info_span!("service", name = S::NAME);
    let _entered = span.enter();
    spawn_in_current_span::<S>(config, kafka, cors, listener, shutdown)
}

fn spawn_in_current_span<S: Service>(
    config: S::Config,
    kafka: KafkaSettings,
    cors: Cors,
    listener: TcpListener,
    shutdown: &CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    crate::spawn(S::run(config, Context::new(S::NAME, kafka, cors, listener, shutdown)))
}

/// A cancellation token cancelled by SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    crate::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
            () = term => tracing::info!("SIGTERM: shutting down"),
        }
        t.cancel();
    });
    token
}

/// The verdict on the broker from its probes and the acknowledgements its producer receives.
#[derive(Debug)]
struct BrokerWatch {
    /// Probes in a row with no answer and no acknowledgement meanwhile.
    failures: u32,
    /// Whether a probe was ever answered (before that, the broker is not taken as reachable).
    ever: bool,
    acks: u64,
}

impl BrokerWatch {
    fn new(acks: u64) -> Self {
        Self { failures: 0, ever: false, acks }
    }

    /// Takes one probe's outcome and the acknowledgements counted so far; returns whether the
    /// broker is reachable: answered, or acknowledging messages, or silent for one probe only.
    fn observe(&mut self, answered: bool, acks: u64) -> bool {
        let acked = acks != self.acks;
        self.acks = acks;
        self.failures = if answered || acked { 0 } else { self.failures + 1 };
        self.ever |= answered;
        answered || acked || (self.ever && self.failures < 2)
    }
}

/// The environment variable a supervisor (`retargetiq up`) sets to its process id, so that
/// its children end with it even when it is killed with `kill -9`.
pub const SUPERVISOR_PID_ENV: &str = "RETARGETIQ_SUPERVISOR_PID";

/// When started by a supervisor that set [`SUPERVISOR_PID_ENV`]: asks the kernel to kill this
/// process when the supervisor dies, and fails if it already has. Without it, a supervisor
/// killed with `kill -9` leaves its children running, holding their ports. `SIGKILL`, not a
/// graceful `SIGTERM`: the broker, a sibling, dies at the same moment, so a graceful stop could
/// not commit anything and would hang on the missing broker; every service is built to be
/// killed (at-least-once delivery, state rebuilt from Kafka). (Linux; elsewhere a no-op.)
pub fn end_with_supervisor() -> anyhow::Result<()> {
    let Some(pid) = std::env::var(SUPERVISOR_PID_ENV).ok().and_then(|v| v.trim().parse::<i32>().ok()) else {
        return Ok(());
    };
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        // The supervisor may have died before the line above: then nobody would signal us.
        anyhow::ensure!(nix::unistd::getppid().as_raw() == pid, "the supervisor (process {pid}) is gone; not starting");
    }
    Ok(())
}

/// The exit code of a service that stopped at start on a setting it could not read (the
/// message names the variable): starting it again changes nothing until the setting does.
pub const CONFIGURATION_ERROR_EXIT: u8 = 2;

/// The whole `main` of a service binary. `<binary> healthcheck` instead asks the running
/// service's `/ready` on `HTTP_PORT` and exits 0 when it answers 200 (for container health
/// checks: the runtime image needs no curl).
pub fn main<S: Service>() -> ExitCode {
    let env = Env::process();
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return healthcheck(&env, S::DEFAULT_PORT);
    }
    let (common, config) = match CommonConfig::from_env(&env, S::DEFAULT_PORT).and_then(|c| Ok((c, S::config(&env)?))) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{}: configuration error: {e}", S::NAME);
            return ExitCode::from(CONFIGURATION_ERROR_EXIT);
        }
    };
    if let Err(e) = end_with_supervisor() {
        eprintln!("{}: {e:#}", S::NAME);
        return ExitCode::FAILURE;
    }
    telemetry::init(common.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: cannot start the async runtime: {e}", S::NAME);
            return ExitCode::FAILURE;
        }
    };
    let span = tracing::info_span!("service", name = S::NAME);
    runtime.block_on(run_until_signal::<S>(common, config).instrument(span))
}

/// `GET /ready` on this machine's `HTTP_PORT`, with a 2 s limit.
fn healthcheck(env: &Env, default_port: u16) -> ExitCode {
    use std::io::{Read, Write};
    let check = || -> std::io::Result<bool> {
        let port: u16 = env.get("HTTP_PORT", default_port).map_err(std::io::Error::other)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut head = [0_u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.") && &head[9..12] == b"200")
    };
    match check() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("not ready");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("health check failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Waits until this instance may read its share of the partitions, and returns the lock that
/// says so (held until the process ends; `None` if shut down while waiting).
///
/// Partitions are shared statically (`INSTANCE_INDEX` of `INSTANCE_COUNT`), so a second process
/// started with the same share — say a second event processor with only another `HTTP_PORT` —
/// would process every message a second time. Instead it waits as a standby: the share is an
/// exclusive lock on a file named after the service, the broker and the share, in
/// `RETARGETIQ_LOCK_DIR` (default: the temporary directory). The operating system releases it
/// when its holder dies, even by `kill -9`, and the standby then takes over from the committed
/// offsets. This covers instances on one host (or containers sharing the lock directory as a
/// volume); across hosts, give each instance its own `INSTANCE_INDEX`.
pub async fn standby(
    service: &str,
    kafka: &KafkaSettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<std::fs::File>> {
    let dir = std::env::var_os("RETARGETIQ_LOCK_DIR").map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    // The broker's address, spelled so that it fits in a file name.
    let broker: String =
        kafka.bootstrap_servers.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(120).collect();
    let path =
        dir.join(format!("retargetiq-{service}-{broker}-{}-of-{}.lock", kafka.instance_index, kafka.instance_count));
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    let mut waiting = false;
    loop {
        match file.try_lock() {
            Ok(()) => {
                if waiting {
                    tracing::info!(lock = %path.display(), "the other instance is gone: taking over");
                }
                return Ok(Some(file));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                if !waiting {
                    tracing::warn!(
                        lock = %path.display(),
                        instance = kafka.instance_index,
                        of = kafka.instance_count,
                        "another instance reads this share of the partitions: waiting as a standby \
                         (give each instance its own INSTANCE_INDEX and INSTANCE_COUNT to share the work)"
                    );
                    waiting = true;
                }
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn run_until_signal<S: Service>(mut common: CommonConfig, config: S::Config) -> ExitCode {
    let shutdown = shutdown_on_signal();
    if S::PARTITIONED && common.kafka.settle_assignment(&shutdown).await.is_none() {
        return ExitCode::SUCCESS;
    }
    // Under the group protocol the group coordinator shares the partitions among however many
    // instances run: no lock, every instance works.
    let _share = if S::PARTITIONED && !common.kafka.uses_group_protocol() {
        match standby(S::NAME, &common.kafka, &shutdown).await {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(service = S::NAME, error = format!("{e:#}"), "cannot take the instance lock");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let listener = match TcpListener::bind(common.http_addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(service = S::NAME, addr = %common.http_addr, error = %e, "cannot listen (set HTTP_PORT to use another port)");
            return ExitCode::FAILURE;
        }
    };
    let mut task = spawn_in_current_span::<S>(config, common.kafka, common.cors, listener, &shutdown);
    let result = tokio::select! {
        r = &mut task => r,
        () = shutdown.cancelled() => match tokio::time::timeout(common.shutdown_timeout, &mut task).await {
            Ok(r) => r,
            Err(_) => {
                tracing::error!(service = S::NAME, timeout = ?common.shutdown_timeout, "did not drain in time; exiting");
                return ExitCode::FAILURE;
            }
        },
    };
    match result {
        Ok(Ok(())) => {
            tracing::info!(service = S::NAME, "stopped");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            tracing::error!(service = S::NAME, error = format!("{e:#}"), "service failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(service = S::NAME, error = %e, "service panicked");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BrokerWatch;

    /// A broker slow to answer one probe under load, or taking messages while its probes time
    /// out, stays reachable (ingestion keeps accepting); one silent for two probes in a row is
    /// not; one never answered is not reachable yet.
    #[test]
    fn one_slow_probe_does_not_make_the_broker_unreachable() {
        let mut w = BrokerWatch::new(0);
        assert!(!w.observe(false, 0), "never answered yet");
        assert!(w.observe(true, 0));
        assert!(w.observe(false, 0), "one probe without an answer: busy, not gone");
        assert!(!w.observe(false, 0), "two in a row, and no acknowledgement: unreachable");
        assert!(w.observe(false, 5), "messages acknowledged meanwhile: reachable");
        assert!(w.observe(false, 9));
        assert!(w.observe(false, 9), "one silent probe again");
        assert!(!w.observe(false, 9));
        assert!(w.observe(true, 9), "back");
    }
}
