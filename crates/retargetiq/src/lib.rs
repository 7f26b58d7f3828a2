//! The `retargetiq` command-line tool: runs the whole platform on one machine, no Docker.
//!
//! - `retargetiq up`: starts a Kafka-compatible broker (embedded Tansu, log files and SQLite under
//!   the data directory, so data survives restarts) unless `KAFKA_BOOTSTRAP_SERVERS` names
//!   another broker, creates the topics, then starts the ten services as child processes,
//!   each output line prefixed with the service name (like `docker compose up`). A service
//!   that dies is restarted with backoff. Ctrl-C (or SIGTERM) stops the services (they drain
//!   and commit), then the broker.
//! - `retargetiq broker`: only the broker, in the foreground.
//! - `retargetiq service <name>`: one service in the foreground (what `up` runs).
//! - `retargetiq topics create`: creates the platform's topics on a broker.
//! - `retargetiq catalog import FILE`: sends a shop's products to the catalog API.
//! - `retargetiq events import FILE`: sends a shopping history through the ingestion APIs.
//! - `retargetiq evaluate`: recommendation quality against baselines, on a shopping history or
//!   on simulated shoppers (`evaluation::history`, `evaluation::simulated`).
//! - `retargetiq evaluate-offers`: the offer bandit against the rule engine (`evaluation::offers`).

pub mod bench;
mod bench_stack;
pub mod catalog_import;
pub mod dead_letters;
pub mod events_import;
pub mod simulate;
mod up;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Each service's contract port.
pub const PORTS: [(&str, u16); 10] = [
    ("user-activity", 8081),
    ("order", 8082),
    ("event-processor", 8083),
    ("analytics", 8084),
    ("feature-store", 8085),
    ("retrieval", 8086),
    ("ranking", 8087),
    ("rl-offer", 8088),
    ("recommendation-api", 8089),
    ("frontend-ui", 3000),
];

/// The contract port of `service` (0 for a name not in [`PORTS`]).
pub fn port_of(service: &str) -> u16 {
    PORTS.iter().find(|(name, _)| *name == service).map_or(0, |(_, port)| *port)
}

pub use kit::telemetry::consumer_lag;

/// The fields of a process's (or a thread's) `/proc/.../stat` after its parenthesised command
/// name: index 0 is proc(5)'s 3rd field (the state); see [`stat_field`] for the others used.
pub fn proc_stat(path: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Indices into [`proc_stat`]'s fields.
pub mod stat_field {
    pub const PARENT: usize = 1;
    pub const PROCESS_GROUP: usize = 2;
    pub const USER_TICKS: usize = 11;
    pub const SYSTEM_TICKS: usize = 12;
    pub const NICENESS: usize = 16;
}

/// (pid, command line) of the running direct children of `parent` (Linux `/proc`): how the
/// tests and benchmarks find the processes `retargetiq up` started.
pub fn child_processes(parent: u32) -> Vec<(u32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            proc_stat(&format!("/proc/{pid}/stat")).and_then(|f| f.get(stat_field::PARENT)?.parse::<u32>().ok())
                == Some(parent)
        })
        .map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args =
                raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned());
            (pid, args.collect())
        })
        .collect()
}

/// The pid of the child of `parent` that has `arg` among its arguments (a service name, or
/// `broker`).
pub fn child_process(parent: u32, arg: &str) -> Option<i32> {
    child_processes(parent)
        .into_iter()
        .find(|(_, args)| args.iter().any(|a| a == arg))
        .and_then(|(pid, _)| i32::try_from(pid).ok())
}

/// The ten services, in start order (producers of a topic before its consumers).
pub const SERVICES: [&str; 10] = [
    "event-processor",
    "feature-store",
    "retrieval",
    "ranking",
    "rl-offer",
    "analytics",
    "recommendation-api",
    "user-activity",
    "order",
    "frontend-ui",
];

#[derive(Debug, Parser)]
#[command(name = "retargetiq", version, about = "Run the RetargetIQ platform locally")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a broker (unless KAFKA_BOOTSTRAP_SERVERS is set) and all ten services.
    Up(up::UpArgs),
    /// Run only the embedded broker.
    Broker(broker::cli::Args),
    /// Run one service in the foreground.
    Service {
        /// One of: user-activity, order, event-processor, analytics, feature-store, retrieval,
        /// ranking, rl-offer, recommendation-api, frontend-ui.
        name: String,
    },
    /// Bring a shop's products in.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Send a shopping history through the ingestion APIs.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Manage the platform's topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Benchmarks, each printing its baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Measure recommendation quality offline against baselines: on a shopping history
    /// (`--events FILE --format rees46|taobao|platform`) or on simulated shoppers.
    Evaluate(EvaluateCommand),
    /// Measure the offer bandit against the original rule engine on simulated traffic.
    EvaluateOffers(evaluation::offers::OffersArgs),
    /// Play realistic shopper sessions against the ingestion APIs.
    Simulate(Box<simulate::SimulateArgs>),
    /// List rejected messages, or send them back to their source topic after a fix.
    DeadLetters {
        #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092", global = true)]
        bootstrap_servers: String,
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLettersCommand {
    /// One line per dead letter: id, time, source topic[partition]@offset, kind, reason.
    List,
    /// Send the named dead letters (or --all) back to their source topic, byte for byte.
    Replay {
        ids: Vec<String>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, clap::Args)]
struct EvaluateCommand {
    /// A shopping history to evaluate on; without it, simulated shoppers.
    #[arg(long)]
    events: Option<std::path::PathBuf>,
    /// How the history is written.
    #[arg(long, value_enum, default_value = "platform")]
    format: evaluation::history::Format,
    /// The held-out period at the end of the history, in hours (fractions allowed).
    #[arg(long, default_value_t = 24.0)]
    holdout_hours: f64,
    /// For tuning: leave the held-out period out and hold out the one before it instead, so
    /// the figures on the real split stay unseen while you tune.
    #[arg(long)]
    validation: bool,
    /// Score a running stack instead of the in-memory replay: send the history before the
    /// held-out period through the ingestion APIs, wait until every consumer caught up, then
    /// ask `GET /recommend/{userId}` for each returning user (use a fresh stack).
    #[arg(long, requires = "events")]
    live: bool,
    /// With `--live`: the host the services listen on (at the contract's ports).
    #[arg(long, default_value = "127.0.0.1", requires = "live")]
    host: String,
    /// With `--live`: how long to wait for the stack to catch up after the import.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration, requires = "live")]
    patience: std::time::Duration,
    #[arg(long, value_enum, default_value = "markdown")]
    output: Output,
    #[command(flatten)]
    simulated: evaluation::simulated::EvaluateArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Markdown,
    Json,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Send a history file (platform JSON lines, rees46 or taobao CSV) in batches.
    Import(events_import::ImportArgs),
}

#[derive(Debug, Subcommand)]
enum CatalogCommand {
    /// Send products from a JSON-lines file to `PUT /api/catalog/products`, in batches.
    Import(catalog_import::ImportArgs),
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create every topic of the platform that does not exist yet.
    Create {
        #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
        bootstrap_servers: String,
        /// Replication factor (3 on a production cluster).
        #[arg(long, default_value_t = 1)]
        replication_factor: i32,
    },
}

/// The whole `main` of the `retargetiq` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Service { name } => run_service(&name),
        Command::Up(args) => block_on(up::run(args)),
        Command::Broker(args) => block_on(run_broker(args)),
        Command::Bench { command } => block_on(bench::run(command)),
        Command::Simulate(args) => block_on(async move {
            let summary = simulate::run(*args).await?;
            println!("{}", summary.report());
            anyhow::ensure!(
                summary.failed == 0 || summary.accepted > 0,
                "no event was accepted: is the platform running?"
            );
            Ok(())
        }),
        Command::Evaluate(args) if args.live => block_on(async move {
            let options = history_options(&args).ok_or_else(|| anyhow::anyhow!("--live needs --events FILE"))?;
            let url = |service: &str, path: &str| format!("http://{}:{}{path}", args.host, port_of(service));
            let stack = evaluation::live::Stack {
                endpoints: evaluation::import::Endpoints {
                    user_activity: url("user-activity", ""),
                    order: url("order", ""),
                },
                recommend: url("recommendation-api", ""),
                metrics: PORTS.iter().map(|(name, _)| url(name, "/metrics")).collect(),
                patience: args.patience,
            };
            let report = evaluation::live::run(&options, &stack).await?;
            println!("{}", if args.output == Output::Json { report.json() } else { report.markdown() });
            Ok(())
        }),
        Command::Evaluate(args) => block_on(async move {
            let text = tokio::task::spawn_blocking(move || evaluate(&args)).await??;
            println!("{text}");
            Ok(())
        }),
        Command::EvaluateOffers(args) => block_on(async move {
            let report = tokio::task::spawn_blocking(move || evaluation::offers::run(&args)).await??;
            println!("{}", report.table());
            Ok(())
        }),
        Command::DeadLetters { bootstrap_servers, command } => block_on(async move {
            match command {
                DeadLettersCommand::List => {
                    let letters = dead_letters::list(&bootstrap_servers).await?;
                    for l in &letters {
                        println!("{}", dead_letters::format_line(l));
                    }
                    println!("{} dead letter(s)", letters.len());
                }
                DeadLettersCommand::Replay { ids, all } => {
                    let n = dead_letters::replay(&bootstrap_servers, &ids, all).await?;
                    println!("replayed {n} dead letter(s)");
                }
            }
            Ok(())
        }),
        Command::Catalog { command: CatalogCommand::Import(args) } => block_on(async move {
            let summary = catalog_import::run(&args).await?;
            println!("{}", summary.report());
            anyhow::ensure!(summary.accepted > 0 || summary.lines == 0, "no product was accepted");
            Ok(())
        }),
        Command::Events { command: EventsCommand::Import(args) } => block_on(async move {
            let summary = events_import::run(&args).await?;
            println!("{}", summary.report());
            Ok(())
        }),
        Command::Topics { command: TopicsCommand::Create { bootstrap_servers, replication_factor } } => {
            block_on(async move {
                kit::kafka::admin::ensure_topics(&bootstrap_servers, replication_factor, Duration::from_secs(30)).await
            })
        }
    }
}

/// The options of a history evaluation (`None` without `--events`: the simulated one).
fn history_options(args: &EvaluateCommand) -> Option<evaluation::history::Options> {
    Some(evaluation::history::Options {
        events: args.events.clone()?,
        format: args.format,
        holdout_hours: args.holdout_hours,
        k: args.simulated.k,
        validation: args.validation,
    })
}

/// `retargetiq evaluate`: the report as text.
fn evaluate(args: &EvaluateCommand) -> anyhow::Result<String> {
    match history_options(args) {
        Some(options) => {
            let report = evaluation::history::run(&options)?;
            Ok(if args.output == Output::Json { report.json() } else { report.markdown() })
        }
        None => {
            let report = evaluation::simulated::run(&args.simulated)?;
            Ok(if args.output == Output::Json { report.json() } else { report.table() })
        }
    }
}

fn block_on(f: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    kit::telemetry::init_to_stderr(kit::telemetry::LogFormat::Text);
    let result = tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(f));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("retargetiq: {e:#}");
            if e.is::<up::Misconfigured>() {
                ExitCode::from(kit::service::CONFIGURATION_ERROR_EXIT)
            } else {
                broker::cli::exit_code(&e)
            }
        }
    }
}

// `up` tells a configuration error by this code, from a service or from the broker.
const _: () = assert!(broker::cli::CONFIGURATION_ERROR_EXIT == kit::service::CONFIGURATION_ERROR_EXIT);

/// Runs the named service as this process.
pub fn run_service(name: &str) -> ExitCode {
    use kit::service::main;
    match name {
        "user-activity" => main::<user_activity::UserActivity>(),
        "order" => main::<order::Order>(),
        "event-processor" => main::<event_processor::EventProcessor>(),
        "analytics" => main::<analytics::Analytics>(),
        "feature-store" => main::<feature_store::FeatureStore>(),
        "retrieval" => main::<retrieval::Retrieval>(),
        "ranking" => main::<ranking::Ranking>(),
        "rl-offer" => main::<rl_offer::RlOffer>(),
        "recommendation-api" => main::<recommendation_api::RecommendationApi>(),
        "frontend-ui" => main::<frontend_ui::FrontendUi>(),
        other => {
            eprintln!("retargetiq: unknown service {other:?}; expected one of {}", SERVICES.join(", "));
            ExitCode::from(2)
        }
    }
}

/// Exit code of a broker process that stopped because a task inside it panicked.
pub const BROKER_PANIC_EXIT: i32 = broker::cli::PANIC_EXIT;

async fn run_broker(args: broker::cli::Args) -> anyhow::Result<()> {
    kit::service::end_with_supervisor()?;
    broker::cli::serve(args, kit::service::shutdown_on_signal()).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn consumer_lag_sums_the_lag_gauges() {
        let text = "# TYPE kafka_consumer_lag gauge\n\
                    kafka_consumer_lag{consumer=\"a\",partition=\"0\"} 5\n\
                    kafka_consumer_lag{consumer=\"a\",partition=\"1\"} 3\n\
                    kafka_consumer_lag{consumer=\"b\",partition=\"0\"} -1\n\
                    consumer_messages_total 7\n";
        assert_eq!(super::consumer_lag(text), 8.0);
        assert_eq!(super::consumer_lag(""), 0.0);
    }
}
