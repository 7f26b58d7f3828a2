//! The platform's topics as the tools create them (`kit::kafka::admin::ensure_topics`, what
//! `retargetiq up` and `retargetiq topics create` run) on a real broker: each with the topic
//! table's configuration, which the broker then holds — the compacted catalog, and the
//! candidate lists kept a day rather than the broker's week.

use std::collections::BTreeMap;
use std::time::Duration;

use events::Topic;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use testkit::TestBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_topic_is_created_with_the_topic_tables_configuration() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    let resources: Vec<ResourceSpecifier<'_>> = Topic::ALL.iter().map(|t| ResourceSpecifier::Topic(t.name())).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin.describe_configs(&resources, &options).await?;
    for (topic, result) in Topic::ALL.iter().zip(described) {
        let resource = result.map_err(|e| anyhow::anyhow!("{topic}: {e}"))?;
        let held: BTreeMap<&str, Option<&str>> =
            resource.entries.iter().map(|e| (e.name.as_str(), e.value.as_deref())).collect();
        for (key, value) in topic.configs() {
            assert_eq!(held.get(key).copied().flatten(), Some(*value), "{topic} {key}: {held:?}");
        }
    }
    let candidates = Topic::Candidates.configs();
    assert!(candidates.contains(&("retention.ms", events::topic::CANDIDATES_RETENTION_MS)), "{candidates:?}");
    assert_eq!(events::topic::CANDIDATES_RETENTION_MS.parse::<u64>()?, 24 * 3600 * 1000);
    Ok(())
}
