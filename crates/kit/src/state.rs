//! State shared between a service's consumers and its HTTP handlers.

use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A value behind a read-write lock, cheap to clone. A panic while the lock was held does not
/// make the value unusable: handlers keep each update small and self-contained, so the state
/// stays consistent, and a service that stopped answering would be worse.
#[derive(Debug, Default)]
pub struct Shared<T>(Arc<RwLock<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Shared<T> {
    pub fn new(value: T) -> Self {
        Self(Arc::new(RwLock::new(value)))
    }

    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Per-user state bounded by [`max_users`]: the least recently active user is forgotten
/// first (a returning user starts afresh). Hashed with foldhash (seeded per process): looked
/// up for every message.
pub type UserMap<V> = lru::LruCache<String, V, foldhash::fast::RandomState>;

/// An empty [`UserMap`] holding at most [`max_users`] users.
pub fn user_map<V>() -> UserMap<V> {
    lru::LruCache::with_hasher(max_users(), foldhash::fast::RandomState::default())
}

static MAX_USERS: std::sync::OnceLock<std::num::NonZeroUsize> = std::sync::OnceLock::new();

/// Default of `MAX_USERS`.
pub const DEFAULT_MAX_USERS: usize = 100_000;

/// `MAX_USERS` (default 100,000): how many users each instance of a stateful service keeps
/// state for. Read and checked at start by [`crate::service::CommonConfig`].
pub fn max_users() -> std::num::NonZeroUsize {
    *MAX_USERS.get_or_init(|| std::num::NonZeroUsize::new(DEFAULT_MAX_USERS).unwrap_or(std::num::NonZeroUsize::MIN))
}

/// Sets `MAX_USERS` for this process (the first setting wins).
pub fn set_max_users(n: std::num::NonZeroUsize) {
    let _ = MAX_USERS.set(n);
}
