//! Typed messages of RetargetIQ and the topic table.
//!
//! This crate is the contract between the services: every Kafka message is one of the types in
//! [`messages`], every topic name is written once, in [`topic`], and the [`Message`] trait ties
//! each type to its topic and its key (always the user id, so a user's events stay in order on
//! one partition). Values are plain camelCase JSON that any Kafka client can read.
//!
//! [`validate`] holds the one set of rules for raw events, used both by the ingestion APIs and,
//! strictly, by the event processor for messages written by foreign producers. [`generate`]
//! makes realistic random events for the "empty body" ingestion mode and for tests.

pub mod generate;
pub mod messages;
pub mod topic;
pub mod validate;

pub use messages::*;
pub use topic::{Message, Topic};

/// Schema version written into every message (`schemaVersion`). Readers accept messages with
/// a version up to this one; fields added later are optional, so older readers keep working.
pub const SCHEMA_VERSION: u32 = 1;

/// The platform-wide identity of an event. A client's `eventId` is unique only among its own
/// user's events (two shops' apps may both count from "1"), so every de-duplication keys by
/// the user and the id together. The separator is a control character, which validation
/// refuses in ids, so no two (user, id) pairs share a key.
pub fn idempotency_key(user_id: &str, event_id: &str) -> String {
    format!("{user_id}\u{1f}{event_id}")
}

/// FNV-1a of `text`, its offset basis XORed with `seed`: a hash that is the same in every
/// process and on every platform (the standard library's is not), for choices that must agree
/// across services and restarts.
pub fn stable_hash(text: &str, seed: u64) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64 ^ seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Kafka header that carries the correlation id from topic to topic.
pub const CORRELATION_HEADER: &str = "correlation-id";
