//! A batch's results (JSONL) read into the answers `/v1/messages` would give.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use crate::wire::error::ErrorKind;
use crate::{BatchEnd, Error};

/// One request's result in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchResult {
    /// The message, as `/v1/messages` answers it (JSON bytes).
    Succeeded(Bytes),
    /// The API's error answer for this request.
    Errored {
        /// The status `/v1/messages` answers this error type with.
        status: StatusCode,
        /// The error body (`{"type":"error","error":{...}}`).
        body: Bytes,
    },
    /// The batch was canceled before this request was processed.
    Canceled,
    /// The batch expired before this request was processed.
    Expired,
}

impl BatchResult {
    /// The answer `/v1/messages` would have given: a `200` with the message, the
    /// error's status and body, or [`Error::Batch`] for a canceled or expired
    /// request.
    pub fn into_response(self, batch_id: &str) -> Result<Response<Bytes>, Error> {
        let (status, body) = match self {
            BatchResult::Succeeded(body) => (StatusCode::OK, body),
            BatchResult::Errored { status, body } => (status, body),
            BatchResult::Canceled | BatchResult::Expired => {
                let end = if self == BatchResult::Canceled {
                    BatchEnd::Canceled
                } else {
                    BatchEnd::Expired
                };
                return Err(Error::Batch {
                    batch_id: Some(batch_id.to_owned()),
                    end,
                    detail: "the request was not processed".to_owned(),
                });
            }
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(response)
    }
}

#[derive(Deserialize)]
struct Line {
    custom_id: String,
    result: ResultField,
}

#[derive(Deserialize)]
struct ResultField {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

const KINDS: [ErrorKind; 8] = [
    ErrorKind::InvalidRequest,
    ErrorKind::Authentication,
    ErrorKind::Permission,
    ErrorKind::NotFound,
    ErrorKind::RequestTooLarge,
    ErrorKind::RateLimit,
    ErrorKind::Api,
    ErrorKind::Overloaded,
];

/// The status of an error body's type (`500` for one the API does not list).
fn status_of(error: &Value) -> StatusCode {
    let kind = error
        .pointer("/error/type")
        .or_else(|| error.get("type"))
        .and_then(Value::as_str);
    KINDS
        .iter()
        .find(|k| Some(k.as_str()) == kind)
        .map_or(StatusCode::INTERNAL_SERVER_ERROR, |k| k.status())
}

/// Reads a results file: one `(custom_id, result)` per line; a line that is
/// not a result is skipped (its request is then answered as missing).
pub(crate) fn parse(jsonl: &[u8]) -> Vec<(String, BatchResult)> {
    jsonl
        .split(|b| *b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .filter_map(|line| serde_json::from_slice::<Line>(line).ok())
        .filter_map(|line| {
            let result = match line.result.kind.as_str() {
                "succeeded" => {
                    BatchResult::Succeeded(Bytes::from(line.result.message?.to_string()))
                }
                "errored" => {
                    let error = line.result.error?;
                    // The API nests the error body: `{"type":"error","error":{...}}`.
                    let body = if error.get("type").and_then(Value::as_str) == Some("error") {
                        error
                    } else {
                        serde_json::json!({"type": "error", "error": error})
                    };
                    BatchResult::Errored {
                        status: status_of(&body),
                        body: Bytes::from(body.to_string()),
                    }
                }
                "canceled" => BatchResult::Canceled,
                "expired" => BatchResult::Expired,
                _ => return None,
            };
            Some((line.custom_id, result))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_result_type_maps_to_the_synchronous_answer() {
        let jsonl = br#"{"custom_id":"a","result":{"type":"succeeded","message":{"type":"message","usage":{"input_tokens":3,"output_tokens":1}}}}
{"custom_id":"b","result":{"type":"errored","error":{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}}}
{"custom_id":"c","result":{"type":"canceled"}}

{"custom_id":"d","result":{"type":"expired"}}
not json
"#;
        let results = parse(jsonl);
        assert_eq!(results.len(), 4);
        let mut it = results.into_iter();
        let (_, a) = it.next().expect("a");
        let a = a.into_response("b1").expect("ok");
        assert_eq!(a.status(), StatusCode::OK);
        assert_eq!(
            crate::wire::usage_of(a.body()).map(|u| u.input_tokens),
            Some(3)
        );
        let (_, b) = it.next().expect("b");
        let b = b.into_response("b1").expect("response");
        assert_eq!(b.status(), StatusCode::BAD_REQUEST);
        let (_, c) = it.next().expect("c");
        assert!(matches!(
            c.into_response("b1"),
            Err(Error::Batch {
                end: BatchEnd::Canceled,
                ..
            })
        ));
        let (_, d) = it.next().expect("d");
        assert!(matches!(
            d.into_response("b1"),
            Err(Error::Batch {
                end: BatchEnd::Expired,
                ..
            })
        ));
    }
}
