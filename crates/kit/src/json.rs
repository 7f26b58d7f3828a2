//! Decoding JSON from bytes (message payloads, request bodies).
//!
//! [`from_bytes`] checks the whole text as UTF-8 once and then parses it as a `str`.
//! `serde_json::from_slice` instead validates every string it meets, one call per string: on
//! the pipeline's own messages (a user's features, a candidate list with ~90 product ids)
//! decoding took 18–29 % less time this way, and every service decodes each message it reads
//! (docs/measurements.md).

use serde::de::DeserializeOwned;

/// Why bytes did not decode.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("not UTF-8 text: {0}")]
    Utf8(#[from] std::str::Utf8Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// Decodes `bytes` as JSON into `T`: what `serde_json::from_slice` gives, found faster.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonError> {
    Ok(serde_json::from_str(std::str::from_utf8(bytes)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn decodes_what_from_slice_decodes() {
        let text = r#"{"id":"prod-é\u00e9\"q\\","n":[1,2.5,-3e2],"tag":null,"nested":{"k":"ünï"}}"#;
        let ours: Value = from_bytes(text.as_bytes()).expect("valid JSON");
        let theirs: Value = serde_json::from_slice(text.as_bytes()).expect("valid JSON");
        assert_eq!(ours, theirs);
        assert_eq!(ours["id"], "prod-éé\"q\\");
    }

    #[test]
    fn says_which_check_failed() {
        let bad_utf8 = from_bytes::<Value>(b"{\"id\":\"caf\xe9\"}").expect_err("Latin-1, not UTF-8");
        assert!(matches!(bad_utf8, JsonError::Utf8(_)), "{bad_utf8:?}");
        assert!(bad_utf8.to_string().starts_with("not UTF-8 text: "), "{bad_utf8}");
        let bad_json = from_bytes::<Value>(b"{\"id\":").expect_err("truncated");
        assert!(matches!(bad_json, JsonError::Json(_)), "{bad_json:?}");
        assert!(bad_json.to_string().contains("EOF"), "{bad_json}");
    }
}
