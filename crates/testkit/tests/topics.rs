//! The platform's topics as the tools create them (`kit::kafka::admin::ensure_topics`, what
//! `retargetiq up` and `retargetiq topics create` run) on a real broker: each with the topic
//! table's configuration, which the broker then holds — the compacted catalog, and the
//! candidate lists kept a day rather than the broker's week. And the tail reader
//! (`kit::kafka::admin::TailReader`, the UI's live feed) on that broker.

use std::collections::BTreeMap;
use std::time::Duration;

use events::Topic;
use kit::kafka::admin::TailReader;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
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

/// Each look of a tail reader gets what the partitions gained since the previous look, at most
/// the newest `n` of each, in partition order; a look with nothing new gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_reader_gets_what_each_partition_gained_at_most_the_newest_n() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    produce(&producer, 0, 0..10).await?;
    produce(&producer, 1, 0..3).await?;
    let mut reader = TailReader::new(&broker.bootstrap(), Topic::ProcessedEvents)?;
    assert_eq!(look(&mut reader).await?, ["p0-6", "p0-7", "p0-8", "p0-9", "p1-0", "p1-1", "p1-2"]);
    assert!(look(&mut reader).await?.is_empty(), "nothing new");
    produce(&producer, 0, 10..12).await?;
    assert_eq!(look(&mut reader).await?, ["p0-10", "p0-11"]);
    produce(&producer, 1, 3..9).await?;
    produce(&producer, 2, 0..1).await?;
    assert_eq!(look(&mut reader).await?, ["p1-5", "p1-6", "p1-7", "p1-8", "p2-0"]);
    Ok(())
}

/// Writes `p{partition}-{v}` for each `v` to that partition of `processed-events-topic`.
async fn produce(producer: &FutureProducer, partition: i32, values: std::ops::Range<u32>) -> anyhow::Result<()> {
    for v in values {
        let value = format!("p{partition}-{v}");
        let record = FutureRecord::to(Topic::ProcessedEvents.name()).partition(partition).key("k").payload(&value);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// One look, at most the newest 4 of each partition, as text.
async fn look(reader: &mut TailReader) -> anyhow::Result<Vec<String>> {
    let read = reader.read_new(4).await?;
    Ok(read.into_iter().map(|m| String::from_utf8_lossy(&m).into_owned()).collect())
}
