//! The broker as a program: `retargetiq broker` (what `retargetiq up` starts) and the
//! `retargetiq-broker` binary (the stand-in for Apache Kafka in a container, which needs
//! neither the services nor a Kafka client: it creates the platform's topics itself).

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use crate::{Options, Storage};

/// Exit code of a broker process that stopped because a task inside it panicked.
pub const PANIC_EXIT: i32 = 70;

/// Exit code of a broker process that cannot run as configured — another broker holds its
/// data directory ([`crate::StorageInUse`]): starting it again changes nothing. The same code
/// as a service's configuration error (`kit::service::CONFIGURATION_ERROR_EXIT`), so that
/// `retargetiq up` stops instead of restarting it.
pub const CONFIGURATION_ERROR_EXIT: u8 = 2;

/// The exit code for a broker that stopped with `error`: [`CONFIGURATION_ERROR_EXIT`] when
/// it could not run as configured, 1 otherwise.
pub fn exit_code(error: &anyhow::Error) -> std::process::ExitCode {
    if error.is::<crate::StorageInUse>() {
        std::process::ExitCode::from(CONFIGURATION_ERROR_EXIT)
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// The broker's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "BROKER_LISTEN", default_value = "127.0.0.1:9092")]
    pub listen: SocketAddr,
    /// `host:port` that clients are told to connect to (default: the listening address).
    #[arg(long, env = "BROKER_ADVERTISED_LISTENER")]
    pub advertise: Option<String>,
    /// Directory of the storage: the SQLite file and the log files (created if missing).
    #[arg(long, env = "RETARGETIQ_DATA_DIR", default_value = "data/broker")]
    pub data_dir: PathBuf,
    /// Keep everything in memory instead (lost on exit).
    #[arg(long)]
    pub memory: bool,
    /// Create the platform's topics (with the topic table's partition counts) when missing,
    /// before accepting clients.
    #[arg(long, env = "BROKER_CREATE_TOPICS")]
    pub create_topics: bool,
    /// Record bytes kept in memory, in KiB, for all partitions together (the newest of each),
    /// so that fetches near the end of a partition need no storage read (0 turns it off; see
    /// `crates/broker/src/tail.rs`).
    #[arg(long, env = "BROKER_TAIL_KB", default_value_t = crate::tail::TAIL_BYTES / 1024)]
    pub tail_kb: usize,
}

/// Runs the broker as this process's only work, until `shutdown`.
///
/// A panic inside the broker can leave it half alive: with Tansu 0.6 a producer retry after a
/// stall panics the storage task, and every later request fails while the process still
/// accepts connections. The broker has this process to itself, so the safe answer to any panic
/// is to exit ([`PANIC_EXIT`]) and let the supervisor (`retargetiq up`, Compose, systemd)
/// restart it from its durable storage.
pub async fn serve(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("retargetiq broker: a task panicked; exiting so the broker restarts from its storage");
        std::process::exit(PANIC_EXIT);
    }));
    let storage = if args.memory {
        Storage::Memory
    } else {
        // Tansu resolves SQLite locations against the working directory: work from the data dir.
        std::fs::create_dir_all(&args.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create the data directory {}: {e}", args.data_dir.display()))?;
        std::env::set_current_dir(&args.data_dir)?;
        Storage::Sqlite("tansu.db".into())
    };
    let topics = if args.create_topics {
        let configs = |t: events::Topic| t.configs().iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        events::Topic::ALL.iter().map(|t| (t.name().to_owned(), t.default_partitions(), configs(*t))).collect()
    } else {
        Vec::new()
    };
    let options = Options { advertised: args.advertise, topics, tail_bytes: Some(args.tail_kb * 1024) };
    crate::run_with(args.listen, storage, options, shutdown).await
}
