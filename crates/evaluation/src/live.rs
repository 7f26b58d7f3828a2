//! `retargetiq evaluate --events FILE --live`: the history evaluation against a running stack.
//!
//! The history before the held-out period (its products first) is sent through the ingestion
//! APIs ([`crate::import`]); once every service's consumers have caught up (their summed
//! `kafka_consumer_lag`, read from each service's `/metrics`, stays at zero), each returning
//! user's list is asked of `GET /recommend/{userId}?k=K` and scored exactly as offline, next to
//! the in-memory replay of the same training events and the baselines, all in the same run.
//! Run it against a fresh stack with no other traffic (`retargetiq up --no-demo-catalog` on a
//! new data directory): what else the stack holds changes the lists.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::history::{self, Options, PLATFORM, Report, Split};
use crate::import::{self, Endpoints};

/// The offline replay's row in a live report.
pub const PLATFORM_REPLAYED: &str = "platform, in-memory replay (same events)";

/// Where the running stack is.
#[derive(Debug, Clone)]
pub struct Stack {
    pub endpoints: Endpoints,
    /// recommendation-api's base URL.
    pub recommend: String,
    /// Every service's `/metrics` URL, for the consumer lag.
    pub metrics: Vec<String>,
    /// How long to wait for the stack to catch up after the import.
    pub patience: Duration,
}

/// Runs the live evaluation.
pub async fn run(options: &Options, stack: &Stack) -> anyhow::Result<Report> {
    let history = history::load(options)?;
    let split = Split::new(&history, options.holdout_hours, options.k)?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;

    let started = Instant::now();
    // One batch at a time, each event made as it goes: the events are not held.
    let mut sender = import::Sender::new(&http, &stack.endpoints, 500, 0.0, split.train.len());
    sender.products(&import::catalog_products(&history.products)?).await?;
    let steps = split.train.iter().enumerate().map(|(i, x)| Ok(history::step(i, x, &history.products)));
    sender.steps(steps).await?;
    let sent = sender.finish().await?;
    eprintln!(
        "evaluate --live: {} products, {} activity events and {} orders sent in {:.1} s; waiting for the stack to catch up",
        sent.products,
        sent.activity,
        sent.orders,
        started.elapsed().as_secs_f64()
    );
    caught_up(&http, stack).await?;
    eprintln!("evaluate --live: caught up {:.1} s after the import began", started.elapsed().as_secs_f64());

    let mut lists = Vec::new();
    for user in split.users() {
        lists.push(recommend(&http, &stack.recommend, user, options.k).await?);
    }
    let replayed = tokio::task::block_in_place(|| split.replayed())?;
    let mut rows = vec![(PLATFORM, lists)];
    rows.extend(replayed.into_iter().map(|(name, l)| (if name == PLATFORM { PLATFORM_REPLAYED } else { name }, l)));
    Ok(tokio::task::block_in_place(|| split.report(rows)))
}

/// Waits until every consumer's lag has read zero twice in a row, 5 s apart (librdkafka
/// reports lag every 5 s).
async fn caught_up(http: &reqwest::Client, stack: &Stack) -> anyhow::Result<()> {
    let deadline = Instant::now() + stack.patience;
    let mut zeros = 0;
    let mut lag = f64::NAN;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(5)).await;
        lag = 0.0;
        for url in &stack.metrics {
            let text = match http.get(url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => anyhow::bail!("{url}: {e} (is the stack running?)"),
            };
            lag += kit::telemetry::consumer_lag(&text);
        }
        zeros = if lag < 1.0 { zeros + 1 } else { 0 };
        if zeros >= 2 {
            return Ok(());
        }
        eprintln!("evaluate --live: consumer lag {lag:.0}");
    }
    anyhow::bail!("the stack did not catch up within {:?} (consumer lag {lag:.0})", stack.patience)
}

/// The product ids of `GET /recommend/{user}?k=K`; none when the API has no list (404).
async fn recommend(http: &reqwest::Client, base: &str, user: &str, k: usize) -> anyhow::Result<Vec<String>> {
    let mut url = url::Url::parse(base).map_err(|e| anyhow::anyhow!("{base}: {e}"))?;
    url.path_segments_mut().map_err(|()| anyhow::anyhow!("{base} cannot take a path"))?.push("recommend").push(user);
    url.query_pairs_mut().append_pair("k", &k.to_string());
    let r = http.get(url.clone()).send().await.map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(Vec::new());
    }
    anyhow::ensure!(r.status().is_success(), "{url} answered {}", r.status());
    let body: Value = r.json().await?;
    Ok(body["recommendations"]
        .as_array()
        .map(|items| items.iter().filter_map(|i| i["itemId"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}
