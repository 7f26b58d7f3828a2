//! An embedded Kafka-compatible broker — [Tansu](https://crates.io/crates/tansu-broker) —
//! so that the whole platform runs on one machine with no Docker and nothing installed by
//! hand: cargo builds the broker with everything else.
//!
//! Storage is either in memory (tests) or SQLite (the default for `retargetiq up`: data
//! survives restarts and `kill -9`). Tansu resolves a `sqlite://` location against the
//! current directory, so [`Storage::Sqlite`] takes a path relative to it; the `retargetiq
//! broker` command changes into its data directory first.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tansu_broker::broker::Broker;
use tansu_broker::coordinator::group::administrator::Controller;
use tansu_storage::StorageContainer;
use tokio_util::sync::CancellationToken;
use url::Url;

/// Where the broker keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// Lost when the broker stops; fastest.
    Memory,
    /// A SQLite file, relative to the current directory (for example `tansu.db`).
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
}

/// Runs a broker listening on `addr` (also the advertised address) until `shutdown`.
pub async fn run(addr: SocketAddr, storage: Storage, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = Url::parse(&format!("tcp://{addr}"))?;
    let mut broker = Broker::<Controller<StorageContainer>, StorageContainer>::builder()
        .node_id(tansu_broker::NODE_ID)
        .cluster_id("retargetiq")
        .incarnation_id(uuid::Uuid::new_v4())
        .advertised_listener(listener.clone())
        .listener(listener)
        .storage(storage.url()?)
        .silent(true)
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("starting the broker: {e:?}"))?;
    tracing::info!(%addr, ?storage, "broker listening");
    tokio::select! {
        r = broker.serve(tokio::time::Instant::now()) => r.map_err(|e| anyhow::anyhow!("broker stopped: {e:?}")),
        () = shutdown.cancelled() => Ok(()),
    }
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
    std::thread::Builder::new().name("broker".into()).spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
        match runtime {
            Ok(rt) => {
                if let Err(e) = rt.block_on(run(addr, storage, shutdown)) {
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

    #[test]
    fn storage_urls() {
        assert_eq!(Storage::Memory.url().expect("url").scheme(), "memory");
        assert_eq!(Storage::Sqlite("tansu.db".into()).url().expect("url").as_str(), "sqlite://tansu.db");
        assert!(Storage::Sqlite("/abs/tansu.db".into()).url().is_err());
        assert!(Storage::Sqlite("../tansu.db".into()).url().is_err());
    }
}
