//! Query strings: the one decoder every endpoint reads its parameters with.
//!
//! A query string is `application/x-www-form-urlencoded`, as browsers, the Go SDK, curl
//! and our client write it: pairs separated by `&`, a key and a value separated by the
//! first `=` (a pair without one has an empty value), `+` for a space and `%XX` for any
//! byte. Keys and values are decoded alike and must be UTF-8.
//!
//! The rules, the same on every route:
//! - A malformed escape (`%` not followed by two hex digits) or a decoded value that is
//!   not UTF-8 is a 400: a parameter the server cannot read is never taken as absent.
//! - A parameter given twice is a 400 when the endpoint reads it (`event_id` lists
//!   several ids with commas), except `subject` on `GET /`: several patterns, one stream.
//!   Parameters an endpoint does not read are ignored, repeated or not, as the reference
//!   ignores them.
//! - Values are returned as decoded; each endpoint trims and interprets them, with the
//!   names and value encodings of [`crate::wire::param`], whose refusals are 400s here.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::wire::ParamError;

/// The decoded parameters of a request's query string, in their order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Decodes a raw query string (without the `?`); `None` is an empty one.
    pub fn parse(raw: Option<&str>) -> Result<Params, ApiError> {
        let mut pairs = Vec::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(key)?;
            let value = decode(value).map_err(|e| {
                ApiError::bad_request(format!("query parameter {key:?}: {}", e.message))
            })?;
            pairs.push((key, value));
        }
        Ok(Params { pairs })
    }

    /// The value of `name`: `None` if it is absent, a 400 if it is given more than once.
    pub fn get(&self, name: &str) -> Result<Option<&str>, ApiError> {
        let mut values = self
            .pairs
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(ApiError::bad_request(format!(
                "query parameter {name:?} is given more than once; give it once"
            )));
        }
        Ok(first)
    }

    /// Every value of `name`, in order: for the one parameter that may repeat (`subject`
    /// of a stream of several subjects).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }

    /// The trimmed value of `name`, `""` if it is absent (the Go SDK sends every parameter,
    /// set or not, so empty and absent mean the same); a 400 if it is given more than once.
    pub fn text(&self, name: &str) -> Result<&str, ApiError> {
        Ok(self.get(name)?.map(str::trim).unwrap_or(""))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Params, ApiError> {
        Params::parse(parts.uri.query())
    }
}

/// A value the wire's encodings refuse is a 400 with their message.
impl From<ParamError> for ApiError {
    fn from(error: ParamError) -> ApiError {
        ApiError::bad_request(error.0)
    }
}

/// Percent-decodes one key or value (`+` is a space).
fn decode(text: &str) -> Result<String, ApiError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let byte = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| {
                        let shown: String = text[i..].chars().take(3).collect();
                        ApiError::bad_request(format!(
                            "the query string has a malformed escape {shown:?}: write % as %25"
                        ))
                    })?;
                out.push(byte);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request("the query string decodes to bytes that are not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_keys_and_values_as_forms_do() {
        let params = Params::parse(Some("subject=orders.%3E&a%5Fb=x+y&flag&&empty=")).unwrap();
        assert_eq!(params.get("subject").unwrap(), Some("orders.>"));
        assert_eq!(params.get("a_b").unwrap(), Some("x y"));
        assert_eq!(params.get("flag").unwrap(), Some(""));
        assert_eq!(params.get("empty").unwrap(), Some(""));
        assert_eq!(params.get("missing").unwrap(), None);
        assert_eq!(params.text("missing").unwrap(), "");
        assert_eq!(Params::parse(None).unwrap(), Params::default());
    }

    #[test]
    fn a_repeated_parameter_is_refused_when_read() {
        let params = Params::parse(Some("timeout=1s&x=1&timeout=2s&x=1")).unwrap();
        let error = params.get("timeout").unwrap_err();
        assert_eq!(error.status, 400);
        assert!(error
            .message
            .contains("\"timeout\" is given more than once"));
        assert!(params.text("x").is_err());
    }

    #[test]
    fn malformed_escapes_and_non_utf8_are_refused() {
        for bad in ["a=%zz", "a=%4", "a=%", "%e9=1", "a=%ff%fe", "a=%+1"] {
            let error = Params::parse(Some(bad)).unwrap_err();
            assert_eq!(error.status, 400, "{bad}");
        }
        assert!(Params::parse(Some("a=%zz"))
            .unwrap_err()
            .message
            .contains("\"a\""));
        // Escaped multi-byte characters are fine.
        let params = Params::parse(Some("s=caf%C3%A9")).unwrap();
        assert_eq!(params.get("s").unwrap(), Some("café"));
    }
}
