//! Typed configuration from environment variables.
//!
//! Every setting has a documented default; a value that does not parse stops the process at
//! start with a message naming the variable ([`ConfigError`]).

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

/// A setting that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for environment variable {var}: {reason}")]
pub struct ConfigError {
    pub var: String,
    pub value: String,
    pub reason: String,
}

/// Where settings come from: the process environment, or a map (tests).
#[derive(Debug, Clone, Default)]
pub struct Env {
    overrides: Option<HashMap<String, String>>,
}

impl Env {
    /// The process environment.
    pub fn process() -> Self {
        Self { overrides: None }
    }

    /// Only these variables (for tests and for running services in-process).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self { overrides: Some(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect()) }
    }

    /// The raw value of a variable; empty counts as unset.
    pub fn raw(&self, var: &str) -> Option<String> {
        let v = match &self.overrides {
            Some(map) => map.get(var).cloned(),
            None => std::env::var(var).ok(),
        };
        v.filter(|s| !s.trim().is_empty())
    }

    /// A typed setting with a default.
    pub fn get<T>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.raw(var) {
            None => Ok(default),
            Some(value) => value.trim().parse().map_err(|e: T::Err| ConfigError {
                var: var.to_owned(),
                value,
                reason: e.to_string(),
            }),
        }
    }

    /// A duration given in milliseconds.
    pub fn millis(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        let ms: u64 = self.get(var, u64::try_from(default.as_millis()).unwrap_or(u64::MAX))?;
        Ok(Duration::from_millis(ms))
    }

    /// A setting checked by `check`, which explains what is wrong.
    pub fn checked<T>(&self, var: &str, default: T, check: impl Fn(&T) -> Result<(), String>) -> Result<T, ConfigError>
    where
        T: FromStr + Display,
        T::Err: Display,
    {
        let v = self.get(var, default)?;
        check(&v).map_err(|reason| ConfigError { var: var.to_owned(), value: v.to_string(), reason })?;
        Ok(v)
    }
}

/// A check for [`Env::checked`]: the number must be greater than zero.
pub fn positive<T: PartialOrd + Default>(v: &T) -> Result<(), String> {
    if *v > T::default() { Ok(()) } else { Err("must be greater than 0".to_owned()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let env = Env::from_pairs([("A", "7"), ("EMPTY", "  "), ("BAD", "seven")]);
        assert_eq!(env.get("A", 1u16), Ok(7));
        assert_eq!(env.get("MISSING", 1u16), Ok(1));
        assert_eq!(env.get("EMPTY", 3u16), Ok(3));
        let err = env.get("BAD", 1u16).expect_err("not a number");
        assert_eq!(err.var, "BAD");
        assert!(err.to_string().contains("BAD") && err.to_string().contains("seven"), "{err}");
        assert_eq!(env.millis("A", Duration::ZERO), Ok(Duration::from_millis(7)));
        let err = env
            .checked("A", 1u32, |v| if *v > 5 { Err("must be at most 5".into()) } else { Ok(()) })
            .expect_err("too big");
        assert_eq!(err.reason, "must be at most 5");
    }
}
