//! The topic table: the only place a topic name is written.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The logical topics of the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Topic {
    UserActivity,
    Order,
    ProcessedEvents,
    DeadLetter,
    UserFeatures,
    Candidates,
    RankedRecommendations,
    Offers,
    Catalog,
}

/// The cluster id of the embedded broker (`retargetiq broker`, what `retargetiq up` starts).
/// Services ask the broker for its cluster id to choose how their instances share partitions
/// (`KAFKA_ASSIGNMENT=auto`): the embedded broker's group coordinator cannot be trusted with
/// members that die during a rebalance.
pub const EMBEDDED_BROKER_CLUSTER_ID: &str = "retargetiq";

/// How long `candidates-topic` keeps its records: a day (in milliseconds). The candidate
/// lists are the largest records of the pipeline (about 40 % of its bytes: each carries the
/// user's feature snapshot for ranking) and only ranking's group reads them, from its
/// committed offsets: no service replays them, and a later list of a user supersedes the
/// earlier ones. A week of them, as other topics are kept, bought nothing but disk; a day
/// still covers a ranking outage of that long.
pub const CANDIDATES_RETENTION_MS: &str = "86400000";

/// (topic, name on the broker, default partition count).
///
/// Every topic but the catalog is keyed by user id, and all have the same partition count so
/// that the topics a service joins (for example features and candidates) are co-partitioned.
/// `catalog-topic` is keyed by product id and compacted (see [`Topic::configs`]).
const TABLE: [(Topic, &str, i32); 9] = [
    (Topic::UserActivity, "user-activity-topic", 4),
    (Topic::Order, "order-topic", 4),
    (Topic::ProcessedEvents, "processed-events-topic", 4),
    (Topic::DeadLetter, "dead-letter-topic", 4),
    (Topic::UserFeatures, "user-features-topic", 4),
    (Topic::Candidates, "candidates-topic", 4),
    (Topic::RankedRecommendations, "ranked-recommendations-topic", 4),
    (Topic::Offers, "offers-topic", 4),
    (Topic::Catalog, "catalog-topic", 4),
];

impl Topic {
    /// Every topic, in pipeline order.
    pub const ALL: [Topic; 9] = [
        Topic::UserActivity,
        Topic::Order,
        Topic::ProcessedEvents,
        Topic::DeadLetter,
        Topic::UserFeatures,
        Topic::Candidates,
        Topic::RankedRecommendations,
        Topic::Offers,
        Topic::Catalog,
    ];

    fn row(self) -> &'static (Topic, &'static str, i32) {
        TABLE.iter().find(|row| row.0 == self).unwrap_or_else(|| unreachable!("every topic has a row in TABLE"))
    }

    /// The name of the topic on the broker.
    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// The partition count the platform creates the topic with.
    pub fn default_partitions(self) -> i32 {
        self.row().2
    }

    /// Topic configuration the platform creates the topic with: the catalog is compacted
    /// (the latest version of each product is kept for ever); the candidate lists are kept a
    /// day ([`CANDIDATES_RETENTION_MS`]); the others use the broker's retention (7 days by
    /// default).
    pub fn configs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Topic::Catalog => &[("cleanup.policy", "compact")],
            Topic::Candidates => &[("retention.ms", CANDIDATES_RETENTION_MS)],
            _ => &[],
        }
    }

    /// The topic with this broker name, if it is one of ours.
    pub fn from_name(name: &str) -> Option<Topic> {
        TABLE.iter().find(|row| row.1 == name).map(|row| row.0)
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A message type that lives on exactly one topic, keyed by [`Message::key`].
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    const TOPIC: Topic;

    /// The Kafka message key: the user id (the product id on `catalog-topic`).
    fn key(&self) -> &str;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_complete_and_names_are_unique() {
        for t in Topic::ALL {
            assert_eq!(Topic::from_name(t.name()), Some(t));
            assert!(t.default_partitions() >= 1);
        }
        let mut names: Vec<_> = Topic::ALL.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Topic::ALL.len());
        assert_eq!(Topic::from_name("no-such-topic"), None);
        assert_eq!(Topic::UserActivity.to_string(), "user-activity-topic");
    }
}
