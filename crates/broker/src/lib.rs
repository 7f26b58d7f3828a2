//! An embedded Kafka-compatible broker — [Tansu](https://crates.io/crates/tansu-broker) —
//! so that the whole platform runs on one machine with no Docker and nothing installed by
//! hand: cargo builds the broker with everything else.
//!
//! Storage is either in memory (tests) or durable (the default for `retargetiq up`: data
//! survives restarts and `kill -9`): SQLite for the metadata and compacted topics, append-only
//! log files for the records of the others ([`logs`]). Tansu resolves a `sqlite://` location against the
//! current directory, so [`Storage::Sqlite`] takes a path relative to it; the `retargetiq
//! broker` command changes into its data directory first.

pub mod cli;
pub mod frames;
pub mod logs;
pub mod long_poll;
pub mod sqlite;
pub mod tail;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rama::layer::{MapErrLayer, MapStateLayer};
use rama::{Layer as _, Service as _};
use tansu_broker::coordinator::group::administrator::Controller;
use tansu_sans_io::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use tansu_sans_io::{ApiKey as _, DeleteRecordsRequest, DeleteTopicsRequest, FetchRequest, ProduceRequest};
use tansu_service::{
    FrameRequestLayer, FrameRouteBuilder, FrameRouteService, TcpBytesLayer, TcpContext, TcpContextLayer,
};
use tansu_storage::{BrokerRegistrationRequest, Storage as _, StorageContainer};
use tokio_util::sync::CancellationToken;
use url::Url;

/// Where the broker keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// Lost when the broker stops: the metadata in memory, the records in scratch log files
    /// in the temporary directory, removed when the broker stops (or, if it was killed, when
    /// the next in-memory broker starts).
    Memory,
    /// A SQLite file, relative to the current directory (for example `tansu.db`), for the
    /// metadata and compacted topics, with the records of the others in log files beside it
    /// ([`Storage::logs_dir`]).
    Sqlite(String),
}

impl Storage {
    fn url(&self) -> anyhow::Result<Url> {
        let url = match self {
            Storage::Memory => "memory://tansu/".to_owned(),
            Storage::Sqlite(file) => {
                anyhow::ensure!(
                    !file.starts_with('/') && !file.contains(".."),
                    "the SQLite file must be given relative to the current directory, got {file:?}"
                );
                format!("sqlite://{file}")
            }
        };
        Url::parse(&url).with_context(|| format!("bad storage URL {url}"))
    }

    /// Where the records of ordinary topics are kept: beside the SQLite file, named after it
    /// with `.logs` (`tansu.db` → `tansu.logs`).
    pub fn logs_dir(&self) -> Option<std::path::PathBuf> {
        match self {
            Storage::Memory => None,
            Storage::Sqlite(file) => Some(logs_beside(file)),
        }
    }

    /// The file whose lock says which broker holds the storage: beside the SQLite file, named
    /// after it with `.lock` (`tansu.db` → `tansu.lock`; see `lock_storage`).
    pub fn lock_file(&self) -> Option<std::path::PathBuf> {
        match self {
            Storage::Memory => None,
            Storage::Sqlite(file) => Some(std::path::Path::new(file).with_extension("lock")),
        }
    }
}

/// The log directory of the SQLite file `file`: `tansu.db` → `tansu.logs`.
fn logs_beside(file: &str) -> std::path::PathBuf {
    std::path::Path::new(file).with_extension("logs")
}

/// Another broker holds the durable storage this one was asked to open.
#[derive(Debug)]
pub struct StorageInUse {
    /// The storage's directory.
    pub dir: std::path::PathBuf,
    /// The holder's process id, as it wrote it in the lock file.
    pub holder: Option<u32>,
}

impl std::fmt::Display for StorageInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the broker's data in {} is in use by another broker", self.dir.display())?;
        if let Some(pid) = self.holder {
            write!(f, " (process {pid})")?;
        }
        f.write_str(": stop that one, or give this one another data directory (--data-dir)")
    }
}

impl std::error::Error for StorageInUse {}

/// Takes the exclusive lock on the file `path` (a durable storage's
/// [`Storage::lock_file`]), held until the returned file is dropped; fails with
/// [`StorageInUse`] when another broker holds it. The operating system releases the lock when
/// its holder ends, even by `kill -9`, so a crash leaves nothing to clean up.
fn lock_storage(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write as _;
    let mut lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => {
            // Who holds it, for the message another broker gives.
            lock.set_len(0)?;
            write!(lock, "{}", std::process::id())?;
            Ok(lock)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok());
            let dir = std::path::absolute(path).ok().and_then(|p| p.parent().map(std::path::Path::to_path_buf));
            Err(StorageInUse { dir: dir.unwrap_or_default(), holder }.into())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
        }
    }
}

/// A topic to create: name, partitions, configuration (key, value).
pub type TopicSpec = (String, i32, Vec<(String, String)>);

/// What a broker does besides listening, beyond the defaults of [`run`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The `host:port` clients are told to connect to (default: the listening address). In a
    /// container the broker listens on `0.0.0.0` and is reached by its service name.
    pub advertised: Option<String>,
    /// Topics (name, partitions, configuration) created at start when missing, before clients
    /// are accepted.
    pub topics: Vec<TopicSpec>,
    /// Record bytes kept in memory, all partitions together, for fetches near the end (default
    /// [`tail::TAIL_BYTES`]; 0: none).
    pub tail_bytes: Option<usize>,
}

/// Runs a broker listening on `addr` (also the advertised address) until `shutdown`.
pub async fn run(addr: SocketAddr, storage: Storage, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(addr, storage, Options::default(), shutdown).await
}

/// Runs a broker listening on `addr` until `shutdown`, as `options` say.
///
/// This is Tansu's broker assembled from its public parts — storage, group coordinator and
/// request handlers — with two handlers of our own: [`long_poll::LongPollFetch`] and
/// [`long_poll::NotifyingProduce`] (see that module for why).
pub async fn run_with(
    addr: SocketAddr,
    storage: Storage,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before anything opens the storage: a second broker on the same files would hand out
    // the same offsets twice and cut off what the first is writing as a torn tail.
    let _lock = storage.lock_file().map(|path| lock_storage(&path)).transpose()?;
    let advertised = options.advertised.clone().unwrap_or_else(|| addr.to_string());
    let listener_url =
        Url::parse(&format!("tcp://{advertised}")).with_context(|| format!("bad advertised address {advertised:?}"))?;
    let sqlite = StorageContainer::builder()
        .cluster_id(CLUSTER_ID)
        .node_id(tansu_broker::NODE_ID)
        .advertised_listener(listener_url)
        .storage(storage.url()?)
        .cancellation(shutdown.clone())
        .silent(true)
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("opening the broker's storage: {e:?}"))?;
    // In memory: the metadata in Tansu's memory engine, the records in scratch log files,
    // removed when this function returns (Tansu's memory engine kept every record for good,
    // and cost half as much CPU again per message as the log files).
    let (engine, _scratch) = match &storage {
        Storage::Sqlite(file) => {
            let repairs = sqlite::Repairs::install(file, CLUSTER_ID).await?;
            let dir = logs_beside(file);
            let engine = logs::Logs::new(sqlite, &dir)
                .with_context(|| format!("opening the log directory {}", dir.display()))?
                .with_repairs(repairs);
            (engine, None)
        }
        Storage::Memory => {
            let dir = scratch_dir().context("creating the in-memory broker's scratch directory")?;
            (logs::Logs::new(sqlite, dir.path())?, Some(dir))
        }
    };
    engine
        .register_broker(BrokerRegistrationRequest {
            broker_id: tansu_broker::NODE_ID,
            cluster_id: CLUSTER_ID.to_owned(),
            incarnation_id: uuid::Uuid::new_v4(),
            rack: None,
        })
        .await
        .map_err(|e| anyhow::anyhow!("registering the broker: {e:?}"))?;
    create_missing_topics(&engine, &options.topics).await?;
    let coordinator =
        Controller::with_storage(engine.clone()).map_err(|e| anyhow::anyhow!("group coordinator: {e:?}"))?;
    let wakeups = Arc::new(long_poll::Wakeups::default());
    let tails = Arc::new(tail::Tails::new(options.tail_bytes.unwrap_or(tail::TAIL_BYTES)));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, ?storage, "broker listening");

    let mut connections = tokio::task::JoinSet::new();
    let mut maintenance = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection");
                        continue;
                    }
                };
                stream.set_nodelay(true)?;
                let service = routes(&engine, coordinator.clone(), &wakeups, &tails)?;
                connections.spawn(async move {
                    if let Err(e) = service.serve(rama::Context::default(), stream).await {
                        tracing::debug!(%peer, error = ?e, "connection ended");
                    }
                });
            }
            _ = maintenance.tick() => {
                let engine = engine.clone();
                connections.spawn(async move {
                    if let Err(e) = engine.maintain(SystemTime::now()).await {
                        tracing::debug!(error = ?e, "storage maintenance");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = shutdown.cancelled() => break,
        }
    }
    connections.abort_all();
    Ok(())
}

/// Prefix of the scratch directories of in-memory brokers, followed by the process id.
const SCRATCH_PREFIX: &str = "retargetiq-broker-memory-";

/// A new scratch directory for an in-memory broker's log files, in the temporary directory.
/// Those left by in-memory brokers that were killed (their process is gone) are removed first.
fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(SCRATCH_PREFIX)) else { continue };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid != std::process::id() && !std::path::Path::new("/proc").join(pid.to_string()).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    tempfile::Builder::new().prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id())).tempdir_in(tmp)
}

/// The storage the broker's handlers work on: Tansu's engine, with the records of ordinary
/// topics in log files when durable ([`logs`]).
type Engine = logs::Logs<StorageContainer>;

const CLUSTER_ID: &str = events::topic::EMBEDDED_BROKER_CLUSTER_ID;

/// Creates those of `topics` (name, partitions) that the storage does not have yet.
async fn create_missing_topics(engine: &Engine, topics: &[TopicSpec]) -> anyhow::Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let metadata = engine.metadata(None).await.map_err(|e| anyhow::anyhow!("listing the topics: {e:?}"))?;
    let existing: Vec<&str> = metadata.topics().iter().filter_map(|t| t.name.as_deref()).collect();
    for (name, partitions, configs) in topics {
        if existing.contains(&name.as_str()) {
            continue;
        }
        let configs = configs
            .iter()
            .map(|(k, v)| CreatableTopicConfig::default().name(k.clone()).value(Some(v.clone())))
            .collect();
        let topic = CreatableTopic::default()
            .name(name.clone())
            .num_partitions(*partitions)
            .replication_factor(1)
            .configs(Some(configs));
        engine.create_topic(topic, false).await.map_err(|e| anyhow::anyhow!("creating topic {name}: {e:?}"))?;
        tracing::info!(topic = %name, partitions, "topic created");
    }
    Ok(())
}

/// Tansu's request handlers for one connection, with Fetch, Produce and the two that delete
/// data replaced by ours.
fn routes(
    engine: &Engine,
    coordinator: Controller<Engine>,
    wakeups: &Arc<long_poll::Wakeups>,
    tails: &Arc<tail::Tails>,
) -> anyhow::Result<impl rama::Service<(), tokio::net::TcpStream, Error = tansu_broker::Error>> {
    use tansu_broker::service::{auth, coordinator as groups, storage as handlers};
    type Route = fn(
        FrameRouteBuilder<(), tansu_broker::Error>,
        Engine,
    ) -> Result<FrameRouteBuilder<(), tansu_broker::Error>, tansu_broker::Error>;
    // Every storage handler of `tansu_broker::service::storage::services` but fetch, produce,
    // the two that delete data (which must also empty the tails) and CreateAcls (Tansu's
    // answer has no results, and librdkafka aborts the client's process on it; without the
    // route the broker does not offer the API, as it does not offer DeleteAcls, and clients
    // say it is not supported).
    let tansus: [Route; 21] = [
        handlers::add_offsets_to_txn,
        handlers::add_partitions_to_txn,
        handlers::alter_user_scram_credentials,
        handlers::consumer_group_describe,
        handlers::create_topics,
        handlers::delete_groups,
        handlers::describe_acls,
        handlers::describe_cluster,
        handlers::describe_configs,
        handlers::describe_groups,
        handlers::describe_topic_partitions,
        handlers::describe_user_scram_credentials,
        handlers::find_coordinator,
        handlers::get_telemetry_subscriptions,
        handlers::incremental_alter_configs,
        handlers::init_producer_id,
        handlers::list_groups,
        handlers::list_offsets,
        handlers::list_partition_reassignments,
        handlers::metadata,
        handlers::txn_offset_commit_request,
    ];
    let error = |e: tansu_broker::Error| anyhow::anyhow!("broker routes: {e:?}");
    let builder = tansus
        .iter()
        .try_fold(FrameRouteService::<(), tansu_broker::Error>::builder(), |builder, route| {
            route(builder, engine.clone())
        })
        .map_err(error)?;
    // One of our handlers, for requests of type `$request`, over the storage.
    macro_rules! ours {
        ($request:ty, $service:expr) => {{
            let engine = engine.clone();
            (
                MapErrLayer::new(tansu_broker::Error::from),
                MapStateLayer::new(move |()| engine),
                FrameRequestLayer::<$request>::new(),
            )
                .into_layer($service)
                .boxed()
        }};
    }
    let fetch = ours!(FetchRequest, long_poll::LongPollFetch::new(wakeups.clone(), tails.clone()));
    let produce = ours!(ProduceRequest, long_poll::NotifyingProduce { wakeups: wakeups.clone(), tails: tails.clone() });
    let delete_records = ours!(
        DeleteRecordsRequest,
        tail::Forgetting { inner: tansu_storage::DeleteRecordsService, tails: tails.clone() }
    );
    let delete_topics = ours!(
        DeleteTopicsRequest,
        tail::Forgetting { inner: tansu_storage::DeleteTopicsService, tails: tails.clone() }
    );
    let route = builder
        .with_route(FetchRequest::KEY, fetch)
        .and_then(|b| b.with_route(ProduceRequest::KEY, produce))
        .and_then(|b| b.with_route(DeleteRecordsRequest::KEY, delete_records))
        .and_then(|b| b.with_route(DeleteTopicsRequest::KEY, delete_topics))
        .map_err(|e| anyhow::anyhow!("broker routes: {e:?}"))
        .and_then(|b| groups::services(b, coordinator).map_err(error))
        .and_then(|b| auth::services(b).map_err(error))
        .and_then(|b| b.build().map_err(|e| anyhow::anyhow!("broker routes: {e:?}")))?;
    Ok((
        TcpContextLayer::new(TcpContext::default().cluster_id(Some(CLUSTER_ID.into()))),
        TcpBytesLayer::default(),
        frames::InlineFrameLayer,
    )
        .into_layer(route))
}

/// Starts a broker in this process on `addr` and waits until it accepts connections.
pub async fn spawn(
    addr: SocketAddr,
    storage: Storage,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let handle = tokio::spawn(run(addr, storage, shutdown));
    wait_for_port(addr, Duration::from_secs(30)).await?;
    Ok(handle)
}

/// Starts a broker on a thread and async runtime of its own (as if it were its own process)
/// and waits until it accepts connections; cancelling `shutdown` stops it. For tests and
/// benchmarks that keep the broker in-process: sharing one runtime with busy services
/// starves it.
pub async fn spawn_dedicated(addr: SocketAddr, storage: Storage, shutdown: CancellationToken) -> anyhow::Result<()> {
    spawn_dedicated_with(addr, storage, Options::default(), shutdown).await
}

/// [`spawn_dedicated`], as `options` say.
pub async fn spawn_dedicated_with(
    addr: SocketAddr,
    storage: Storage,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::thread::Builder::new().name("broker".into()).spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
        match runtime {
            Ok(rt) => {
                if let Err(e) = rt.block_on(run_with(addr, storage, options, shutdown)) {
                    tracing::error!(error = format!("{e:#}"), "broker failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "no runtime for the broker"),
        }
    })?;
    wait_for_port(addr, Duration::from_secs(30)).await
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, patience: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "nothing listens on {addr} after {patience:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API keys the broker offers, from its answer to ApiVersions (v0, encoded by hand).
    async fn offered_api_keys(addr: SocketAddr) -> anyhow::Result<Vec<i16>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        // api key 18 (ApiVersions), version 0, correlation id 7, no client id
        let body: [u8; 10] = [0, 18, 0, 0, 0, 0, 0, 7, 0xff, 0xff];
        stream.write_all(&(body.len() as u32).to_be_bytes()).await?;
        stream.write_all(&body).await?;
        let size = stream.read_u32().await?;
        let mut answer = vec![0; size as usize];
        stream.read_exact(&mut answer).await?;
        let int16 = |at: usize| i16::from_be_bytes([answer[at], answer[at + 1]]);
        anyhow::ensure!(answer[..4] == 7_i32.to_be_bytes(), "not the answer to correlation id 7");
        anyhow::ensure!(int16(4) == 0, "ApiVersions answered error code {}", int16(4));
        let count = i32::from_be_bytes([answer[6], answer[7], answer[8], answer[9]]);
        Ok((0..usize::try_from(count)?).map(|i| int16(10 + 6 * i)).collect())
    }

    /// The durable storage is held by one broker at a time: a second is refused, naming the
    /// holder, until the first lets go.
    #[test]
    fn a_second_broker_cannot_take_the_same_storage() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(Storage::Sqlite("tansu.db".into()).lock_file(), Some("tansu.lock".into()));
        let file = dir.path().join("tansu.lock");
        let first = lock_storage(&file)?;
        let refused = lock_storage(&file).expect_err("the storage is held");
        let in_use = refused.downcast_ref::<StorageInUse>().expect("StorageInUse");
        assert_eq!(in_use.holder, Some(std::process::id()));
        assert_eq!(in_use.dir, dir.path());
        assert!(refused.to_string().contains("in use by another broker"), "{refused}");
        assert_eq!(cli::exit_code(&refused), std::process::ExitCode::from(cli::CONFIGURATION_ERROR_EXIT));
        drop(first);
        lock_storage(&file)?;
        Ok(())
    }

    /// CreateAcls is not offered (Tansu's answer made librdkafka abort its client's process);
    /// reading ACLs, and what the pipeline uses, are.
    #[tokio::test]
    async fn the_broker_does_not_offer_create_acls() -> anyhow::Result<()> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let shutdown = CancellationToken::new();
        spawn_dedicated(addr, Storage::Memory, shutdown.clone()).await?;
        let offered = offered_api_keys(addr).await;
        shutdown.cancel();
        let offered = offered?;
        let (produce, fetch, describe_acls, create_acls, delete_acls) = (0, 1, 29, 30, 31);
        for key in [produce, fetch, describe_acls] {
            assert!(offered.contains(&key), "API key {key} not offered: {offered:?}");
        }
        for key in [create_acls, delete_acls] {
            assert!(!offered.contains(&key), "API key {key} offered: {offered:?}");
        }
        Ok(())
    }

    #[test]
    fn storage_urls() {
        assert_eq!(Storage::Memory.url().expect("url").scheme(), "memory");
        assert_eq!(Storage::Sqlite("tansu.db".into()).url().expect("url").as_str(), "sqlite://tansu.db");
        assert!(Storage::Sqlite("/abs/tansu.db".into()).url().is_err());
        assert!(Storage::Sqlite("../tansu.db".into()).url().is_err());
    }
}
