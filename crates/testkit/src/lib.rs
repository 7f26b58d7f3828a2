//! Test support: a real Kafka-protocol broker (embedded Tansu, in memory) on a free port with
//! the platform's topics created, and helpers to wait for eventual outcomes.

pub mod arbitrary;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A broker for one test, stopped when dropped.
pub struct TestBroker {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

impl TestBroker {
    /// Starts an in-memory broker on a free port, creates every topic of the platform and
    /// loads the demo catalog (as `retargetiq up` does).
    pub async fn start() -> anyhow::Result<Self> {
        let broker = Self::bare().await?;
        kit::kafka::admin::ensure_topics(&broker.bootstrap(), 1, Duration::from_secs(30)).await?;
        kit::catalog::load_demo_if_empty(&broker.settings()).await?;
        Ok(broker)
    }

    /// Starts an in-memory broker on a free port with no topics.
    pub async fn bare() -> anyhow::Result<Self> {
        kit::telemetry::init(kit::telemetry::LogFormat::Text);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let shutdown = CancellationToken::new();
        // The broker gets a runtime (and threads) of its own, as it has its own process in
        // production: the services under test can never starve it, nor it them.
        broker::spawn_dedicated(addr, broker::Storage::Memory, shutdown.clone()).await?;
        Ok(Self { addr, shutdown })
    }

    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    pub fn settings(&self) -> kit::kafka::KafkaSettings {
        kit::kafka::KafkaSettings::for_embedded_broker(self.bootstrap())
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Makes a panic end the test process (exit code 101, after the usual message). For tests
/// that run services in-process: after a failed assertion the runtime's shutdown can wait
/// forever on a Kafka client call blocked on a broker that is already gone, and a failing
/// test must fail, not hang CI.
pub fn exit_on_panic() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            // In a test's thread the default hook writes into the test's captured output, which
            // the harness never prints once the process exits: say it on the real stderr too.
            let thread = std::thread::current();
            let said = format!("panicked in thread {}: {info}\n", thread.name().unwrap_or("unnamed"));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), said.as_bytes());
            std::process::exit(101);
        }));
    });
}

/// A port nothing listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A port offset for a whole stack (`retargetiq up --port-offset`): the contract ports (3000
/// to 8089) plus the offset, and up to `spread` above them, stay below the start of the
/// machine's ephemeral port range, where the system picks the local ports of outgoing
/// connections — a service port in that range can be held by any other process's connection
/// (which once kept a test's user-activity from starting). Random within the allowed range,
/// so stacks of different test runs rarely meet.
pub fn stack_port_offset(spread: u16) -> std::io::Result<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let lowest = 10_000;
    let highest = ephemeral_start.saturating_sub(8_090 + spread);
    if highest <= lowest {
        return Err(std::io::Error::other(format!("no room for a stack below port {ephemeral_start}")));
    }
    Ok(lowest + free_port()? % (highest - lowest))
}

/// Polls `probe` every 100 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
