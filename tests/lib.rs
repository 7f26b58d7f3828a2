//! The whole fleet in one process, for end-to-end tests: a real broker (embedded Tansu) and
//! the ten services, each on its own port, talking to each other only through Kafka — the
//! same code `retargetiq up` runs as separate processes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use kit::Service;
use kit::config::Env;
use testkit::{TestBroker, eventually};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The operations token the fleet's services are configured with.
pub const OPS_TOKEN: &str = "fleet-test-operations-token";

/// A running fleet; stopped (gracefully) by [`Fleet::stop`] or when dropped.
pub struct Fleet {
    pub broker: TestBroker,
    pub addrs: BTreeMap<&'static str, SocketAddr>,
    /// The one origin every service allows browser scripts from (`CORS_ALLOWED_ORIGINS`): the
    /// UI's port named `localhost`, so that the UI's pages opened as `http://localhost:<port>`
    /// may call the APIs and the same pages opened as `http://127.0.0.1:<port>` may not.
    pub allowed_origin: String,
    cors: kit::http::Cors,
    shutdown: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
    http: reqwest::Client,
}

async fn bind() -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind("127.0.0.1:0").await?)
}

impl Fleet {
    /// Starts a broker and all ten services, and waits until every `/ready` says 200.
    pub async fn start() -> anyhow::Result<Self> {
        testkit::exit_on_panic();
        let broker = TestBroker::start().await?;
        let ui_listener = bind().await?;
        let allowed_origin = format!("http://localhost:{}", ui_listener.local_addr()?.port());
        let mut fleet = Fleet {
            broker,
            addrs: BTreeMap::new(),
            cors: allowed_origin.parse().map_err(anyhow::Error::msg)?,
            allowed_origin,
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
        };
        let env = Env::from_pairs([("OPS_TOKEN", OPS_TOKEN)]);
        fleet.spawn::<user_activity::UserActivity>(()).await?;
        fleet.spawn::<order::Order>(()).await?;
        fleet.spawn::<event_processor::EventProcessor>(event_processor::EventProcessor::config(&env)?).await?;
        fleet.spawn::<analytics::Analytics>(analytics::Analytics::config(&env)?).await?;
        fleet.spawn::<feature_store::FeatureStore>(feature_store::FeatureStore::config(&env)?).await?;
        fleet.spawn::<retrieval::Retrieval>(()).await?;
        fleet.spawn::<ranking::Ranking>(ranking::Config::default()).await?;
        fleet.spawn::<rl_offer::RlOffer>(rl_offer::RlOffer::config(&env)?).await?;
        fleet.spawn::<recommendation_api::RecommendationApi>(()).await?;
        let url = |name: &str| -> anyhow::Result<reqwest::Url> {
            Ok(reqwest::Url::parse(&format!("http://{}", fleet.addrs[name]))?)
        };
        let ui = frontend_ui::Config {
            user_activity: url("user-activity")?,
            order: url("order")?,
            event_processor: url("event-processor")?,
            analytics: url("analytics")?,
            feature_store: url("feature-store")?,
            retrieval: url("retrieval")?,
            ranking: url("ranking")?,
            rl_offer: url("rl-offer")?,
            recommendation_api: url("recommendation-api")?,
        };
        fleet.spawn_on::<frontend_ui::FrontendUi>(ui_listener, ui)?;
        for name in fleet.addrs.keys().copied().collect::<Vec<_>>() {
            let url = fleet.url(name, "/ready");
            let http = fleet.http.clone();
            eventually(&format!("{name} to be ready"), Duration::from_secs(60), || {
                let (http, url) = (http.clone(), url.clone());
                async move { http.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
            })
            .await?;
        }
        Ok(fleet)
    }

    async fn spawn<S: Service>(&mut self, config: S::Config) -> anyhow::Result<()> {
        self.spawn_on::<S>(bind().await?, config)
    }

    fn spawn_on<S: Service>(&mut self, listener: TcpListener, config: S::Config) -> anyhow::Result<()> {
        self.addrs.insert(S::NAME, listener.local_addr()?);
        let task =
            kit::service::start::<S>(config, self.broker.settings(), self.cors.clone(), listener, &self.shutdown);
        self.tasks.push((S::NAME, task));
        Ok(())
    }

    /// `http://<address of service>/<path>`.
    pub fn url(&self, service: &str, path: &str) -> String {
        format!("http://{}{path}", self.addrs[service])
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Stops every service and checks that each drained and exited cleanly.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for (name, task) in std::mem::take(&mut self.tasks) {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .map_err(|_| anyhow::anyhow!("{name} did not stop within 20 s"))?
                .map_err(|e| anyhow::anyhow!("{name} panicked: {e}"))?
                .map_err(|e| anyhow::anyhow!("{name} failed: {e:#}"))?;
        }
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
