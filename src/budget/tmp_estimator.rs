//! TEMPORARY until the estimate branch lands: removed at merge.
use crate::estimate::{Estimate, TokenEstimator};
use http::request::Parts;
#[derive(Debug, Default)]
pub(crate) struct AnthropicEstimator;
impl AnthropicEstimator {
    pub(crate) fn new() -> Self {
        Self
    }
}
impl TokenEstimator for AnthropicEstimator {
    fn estimate(&self, _parts: &Parts, body: &[u8]) -> Estimate {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        Estimate {
            model: v["model"].as_str().map(str::to_owned),
            input_tokens: body.len() as u64 / 4,
            raw_input_tokens: body.len() as u64 / 4,
            cache_read_tokens: 0,
            max_tokens: v["max_tokens"].as_u64(),
            stream: v["stream"].as_bool().unwrap_or(false),
            fallback: false,
        }
    }
    fn estimate_unbuffered(&self, _parts: &Parts, body_len: Option<u64>) -> Estimate {
        Estimate {
            input_tokens: body_len.unwrap_or(0) / 2,
            fallback: true,
            ..Estimate::default()
        }
    }
}
