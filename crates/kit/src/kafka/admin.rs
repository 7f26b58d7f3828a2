//! Topic creation. Tansu does not create topics on first produce, and a real cluster should
//! not either, so every tool that starts the platform creates the topics explicitly.

use std::time::Duration;

use anyhow::Context as _;
use events::Topic;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

/// Creates every topic of the platform that does not exist yet. Retries until the broker
/// answers or `patience` runs out.
pub async fn ensure_topics(bootstrap_servers: &str, replication_factor: i32, patience: Duration) -> anyhow::Result<()> {
    let topics: Vec<(String, i32)> = Topic::ALL.iter().map(|t| (t.name().to_owned(), t.default_partitions())).collect();
    ensure_named_topics(bootstrap_servers, &topics, replication_factor, patience).await
}

/// Creates the named topics (name, partitions) that do not exist yet.
pub async fn ensure_named_topics(
    bootstrap_servers: &str,
    topics: &[(String, i32)],
    replication_factor: i32,
    patience: Duration,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .create()
        .context("creating the Kafka admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(replication_factor)))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let last_error = match admin.create_topics(&new, &options).await {
            Ok(results) => {
                let failures: Vec<String> = results
                    .into_iter()
                    .filter_map(|r| match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                        Err((name, code)) => Some(format!("{name}: {code}")),
                    })
                    .collect();
                if failures.is_empty() {
                    tracing::info!(count = topics.len(), "topics ready");
                    return Ok(());
                }
                failures.join(", ")
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("could not create topics on {bootstrap_servers}: {last_error}");
        }
        tracing::debug!(error = %last_error, "broker not ready for topic creation yet; retrying");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
