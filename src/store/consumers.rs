//! Durable consumers as storage knows them: the progress a backend keeps for each (see
//! [`ConsumerProgress`]), the names it is kept under ([`ConsumerName`], the only thing that
//! may name one) and who owns one ([`Owner`]). Data only; the stores are behind
//! [`super::api::ConsumerStore`].

use serde::{Deserialize, Serialize};

/// What a durable consumer has stored: where its reading is, and which events it read
/// but has not had acknowledged. Everything before `next` that is not in `unacked` is
/// done (acknowledged, given up, or not matching).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsumerProgress {
    pub pattern: String,
    pub next: u64,
    pub unacked: Vec<u64>,
    /// Who created the consumer when requests are authenticated (an [`Owner`]); only
    /// they, or a caller with the admin grant, may attach to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// `[position, deliveries]` of the unacknowledged events delivered so far: an event
    /// is given up after its last delivery whether or not its consumer stopped meanwhile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivered: Vec<[u64; 2]>,
    /// `[position, unix milliseconds]` of events a negative ack delayed: not delivered
    /// before then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delayed: Vec<[u64; 2]>,
    /// Unacknowledged events whose one reply was taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replied: Vec<u64>,
}

impl ConsumerProgress {
    /// The first position that is not done.
    pub fn floor(&self) -> u64 {
        self.unacked.iter().copied().min().unwrap_or(self.next)
    }
}

/// Who opened a subscription or created a durable consumer, as the front end identifies
/// callers when requests are authenticated: an opaque value, compared for equality only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Owner(pub String);

/// A durable consumer's name: 1 to 64 ASCII letters, digits, `_` or `-`. It becomes a file
/// name and a subject segment, so every name from a client goes through
/// [`ConsumerName::parse`] before it is used, and nothing else can name a file.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerName(String);

impl ConsumerName {
    /// The name, or a message that says what a name may contain.
    pub fn parse(text: &str) -> Result<ConsumerName, String> {
        let valid = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if valid {
            Ok(ConsumerName(text.to_owned()))
        } else {
            Err(format!(
                "consumer: {text:?} is not a valid name (1 to 64 letters, digits, _ or -)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Quoted, as a string is: messages write `consumer {name:?}`.
impl std::fmt::Debug for ConsumerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::fmt::Display for ConsumerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_file_names_of_their_own_directory_only() {
        for good in ["billing", "a", "Invoice_2-x", &"n".repeat(64)] {
            assert_eq!(ConsumerName::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            "a.b",
            "a\\b",
            "a\0",
            "é",
            &"n".repeat(65),
        ] {
            let error = ConsumerName::parse(bad).unwrap_err();
            assert!(error.contains("not a valid name"), "{bad:?}: {error}");
        }
    }
}
