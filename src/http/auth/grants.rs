//! What a token may do: per operation, a list of subject patterns — one model for the
//! token file and for JWTs.
//!
//! A grant is a pattern in the syntax of [`crate::subject`] (the namespace, then `*` for
//! one segment and `>` for the rest) or `>` alone, every subject. What a request names
//! decides how it is checked ([`Target`]):
//!
//! - a subject (publishing, and a reply carried by an ack): a grant must match it;
//! - a pattern (subscribing): it must lie within a grant — every subject it could match
//!   is matched by the grant ([`crate::subject::pattern_contains`]): `chat.room1` and
//!   `chat.*.x` lie within `chat.>`, `chat.>` does not lie within `chat.*`;
//! - a namespace (acks, `admin`): a grant in that namespace, whatever its pattern, or `>`;
//! - anything (`metrics`, and an ack no consumer waits for): any grant at all.
//!
//! A token file's namespaces are the patterns `ns.>` (`*` is `>`), so both kinds of token
//! are checked by the same code; only the wording of a refusal differs, as each points to
//! where the grant is to be asked for.

use std::fmt;

use crate::subject::{check_grant_pattern, pattern_contains};

/// What a token may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    /// `POST /`.
    Publish,
    /// `GET /`.
    Subscribe,
    /// `PUT /`.
    Ack,
    /// `GET /metrics`.
    Metrics,
    /// `/consumers` and `/admin/reload`.
    Admin,
}

impl Operation {
    /// Every operation, in the order of the `bus` claim's documentation.
    pub const ALL: [Operation; 5] = [
        Operation::Publish,
        Operation::Subscribe,
        Operation::Ack,
        Operation::Admin,
        Operation::Metrics,
    ];

    pub(super) fn parse(text: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.name() == text)
    }

    /// The operation's name, as a token file and the `bus` claim write it.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::Ack => "ack",
            Operation::Metrics => "metrics",
            Operation::Admin => "admin",
        }
    }

    fn index(self) -> usize {
        match self {
            Operation::Publish => 0,
            Operation::Subscribe => 1,
            Operation::Ack => 2,
            Operation::Admin => 3,
            Operation::Metrics => 4,
        }
    }
}

/// What a request names, to be checked against a token's grants (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// A subject published to.
    Subject(&'a str),
    /// A pattern subscribed to.
    Pattern(&'a str),
    /// A namespace acted on as a whole.
    Namespace(&'a str),
    /// No namespace in particular: a grant of the operation anywhere will do.
    Any,
}

impl Target<'_> {
    /// The namespace named, if any.
    fn namespace(&self) -> Option<&str> {
        match self {
            Target::Subject(text) | Target::Pattern(text) => text.split('.').next(),
            Target::Namespace(namespace) => Some(namespace),
            Target::Any => None,
        }
    }
}

/// Where a token's grants come from, which decides how a refusal is worded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A line of the token file: grants by namespace.
    TokenFile,
    /// The `bus` claim of a JWT: grants by pattern.
    Jwt,
}

/// A token's grants: for each operation, the patterns it covers.
#[derive(Clone, PartialEq, Eq)]
pub struct Grants {
    patterns: [Vec<String>; 5],
    source: Source,
}

impl fmt::Debug for Grants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for op in Operation::ALL {
            map.entry(&op.name(), &self.patterns[op.index()]);
        }
        map.finish()
    }
}

impl Grants {
    /// No grants yet, from `source`.
    pub fn new(source: Source) -> Grants {
        Grants {
            patterns: Default::default(),
            source,
        }
    }

    /// Adds `pattern` to what `operation` covers; an error says what is wrong with it.
    pub fn add(&mut self, operation: Operation, pattern: &str) -> Result<(), String> {
        check_grant_pattern(pattern).map_err(|e| {
            format!("{e} (a grant is a subject pattern like chat.room1, chat.* or chat.>, or > for everything)")
        })?;
        let patterns = &mut self.patterns[operation.index()];
        if !patterns.iter().any(|p| p == pattern) {
            patterns.push(pattern.to_owned());
        }
        Ok(())
    }

    /// Whether `operation` on `target` is granted.
    pub fn allows(&self, operation: Operation, target: Target<'_>) -> bool {
        let patterns = &self.patterns[operation.index()];
        match target {
            Target::Subject(text) | Target::Pattern(text) => {
                patterns.iter().any(|grant| pattern_contains(grant, text))
            }
            Target::Namespace(namespace) => patterns
                .iter()
                .any(|grant| grant == ">" || grant.split('.').next() == Some(namespace)),
            Target::Any => !patterns.is_empty(),
        }
    }

    /// `Ok` if [`Grants::allows`], else the sentence of a 403: the operation and what it
    /// names, and where to ask for the grant.
    pub fn check(&self, operation: Operation, target: Target<'_>) -> Result<(), String> {
        if self.allows(operation, target) {
            return Ok(());
        }
        let op = operation.name();
        Err(match self.source {
            // The file grants by namespace: the refusal names the namespace, as it always
            // has.
            Source::TokenFile => {
                let what = match target.namespace() {
                    Some(namespace) => format!("{op} in namespace {namespace:?}"),
                    None => op.to_owned(),
                };
                format!("this token may not {what}; ask for a grant in the server's auth file")
            }
            Source::Jwt => {
                let what = match target {
                    Target::Subject(subject) => format!("{op} to {subject:?}"),
                    Target::Pattern(pattern) => format!("{op} to {pattern:?}"),
                    Target::Namespace(namespace) => format!("{op} in namespace {namespace:?}"),
                    Target::Any => op.to_owned(),
                };
                format!(
                    "this token may not {what}; its \"bus\" claim grants {op} on {:?}",
                    self.patterns[operation.index()]
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(list: &[(Operation, &str)]) -> Grants {
        let mut grants = Grants::new(Source::Jwt);
        for (op, pattern) in list {
            grants.add(*op, pattern).unwrap();
        }
        grants
    }

    #[test]
    fn each_target_is_checked_its_own_way() {
        use Operation::*;
        let g = grants(&[
            (Publish, "chat.room1"),
            (Subscribe, "chat.>"),
            (Subscribe, "orders.*"),
            (Ack, "chat.room1"),
            (Admin, ">"),
        ]);
        assert!(g.allows(Publish, Target::Subject("chat.room1")));
        assert!(!g.allows(Publish, Target::Subject("chat.room2")));
        assert!(g.allows(Subscribe, Target::Pattern("chat.*.x")));
        assert!(g.allows(Subscribe, Target::Pattern("orders.eu")));
        assert!(!g.allows(Subscribe, Target::Pattern("orders.>")));
        assert!(g.allows(Ack, Target::Namespace("chat")));
        assert!(!g.allows(Ack, Target::Namespace("orders")));
        assert!(g.allows(Ack, Target::Any));
        assert!(g.allows(Admin, Target::Namespace("anything")));
        assert!(!g.allows(Metrics, Target::Any));
        let refusal = g.check(Publish, Target::Subject("chat.room2")).unwrap_err();
        assert!(
            refusal.contains("publish to \"chat.room2\"") && refusal.contains("[\"chat.room1\"]"),
            "{refusal}"
        );
    }

    #[test]
    fn a_token_file_grant_is_namespace_wide_and_says_so() {
        let mut g = Grants::new(Source::TokenFile);
        g.add(Operation::Publish, "orders.>").unwrap();
        assert!(g.allows(Operation::Publish, Target::Subject("orders.a.b")));
        let refusal = g
            .check(Operation::Publish, Target::Subject("billing.x"))
            .unwrap_err();
        assert!(
            refusal.contains("publish in namespace \"billing\"") && refusal.contains("auth file"),
            "{refusal}"
        );
    }

    #[test]
    fn bad_patterns_say_what_a_grant_looks_like() {
        let error = Grants::new(Source::Jwt)
            .add(Operation::Publish, "chat")
            .unwrap_err();
        assert!(error.contains("chat.room1, chat.* or chat.>"), "{error}");
    }
}
