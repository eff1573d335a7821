//! Subjects and subscription patterns: parsing, validation and matching.
//!
//! A subject is dot-separated segments, `orders.eu.created`; the first segment is the
//! namespace (the log the event goes to). A segment is one or more letters, digits, `_` or
//! `-` (letters and digits of any script, as the reference server accepts them); a subject
//! has at least two segments. A pattern is a subject in which a whole
//! segment after the namespace may be `*` (exactly one segment) or, as the last segment,
//! `>` (one or more segments). `_bus_.…` subjects are in-memory inboxes: they are
//! published to and subscribed to by exact name only.
//!
//! Errors are sentences meant for the person who wrote the subject.

use std::fmt;

/// The namespace of in-memory inbox subjects.
pub const INBOX_NAMESPACE: &str = "_bus_";

/// Why a subject or pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject {subject:?}: {reason}")]
pub struct SubjectError {
    pub subject: String,
    pub reason: &'static str,
}

/// A subject events can be published to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    text: &'a str,
}

impl<'a> Subject<'a> {
    pub fn parse(text: &'a str) -> Result<Subject<'a>, SubjectError> {
        check(text, false)?;
        Ok(Subject { text })
    }

    pub fn as_str(&self) -> &'a str {
        self.text
    }

    pub fn namespace(&self) -> &'a str {
        namespace_of(self.text)
    }

    /// Whether this is an in-memory inbox subject (`_bus_.…`).
    pub fn is_inbox(&self) -> bool {
        self.namespace() == INBOX_NAMESPACE
    }
}

/// A subscription pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    /// True when the pattern has no wildcard: matching is string equality.
    exact: bool,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, SubjectError> {
        check(text, true)?;
        let exact = !text.split('.').any(|s| s == "*" || s == ">");
        if !exact && namespace_of(text) == INBOX_NAMESPACE {
            return Err(error(
                text,
                "inbox subjects (_bus_.…) are subscribed to by exact name, without wildcards",
            ));
        }
        Ok(Pattern {
            text: text.to_owned(),
            exact,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn namespace(&self) -> &str {
        namespace_of(&self.text)
    }

    pub fn is_inbox(&self) -> bool {
        self.namespace() == INBOX_NAMESPACE
    }

    /// Whether `subject` (a valid subject) matches this pattern.
    pub fn matches(&self, subject: &str) -> bool {
        if self.exact {
            return self.text == subject;
        }
        let mut subject_segments = subject.split('.');
        for segment in self.text.split('.') {
            match segment {
                ">" => return subject_segments.next().is_some(),
                "*" => {
                    if subject_segments.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if subject_segments.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        subject_segments.next().is_none()
    }
}

/// Whether every subject that the pattern `inner` matches is also matched by `outer`: the
/// pattern a subscription asks for (`inner`) lies within a pattern a token was granted
/// (`outer`). Both are patterns in the syntax above, except that `outer` may also be `>`
/// alone (every subject of every namespace) and either may have wildcards in `_bus_`;
/// a subject is a pattern without wildcards, so `pattern_contains(grant, subject)` says
/// whether the grant matches that subject.
///
/// Segment by segment: `>` in `outer` covers whatever `inner` has there and after, if
/// anything (one segment at least); `*` covers one segment of `inner`, a literal or `*`,
/// but not `>` (which may be several); a literal covers only itself. `chat.room1` and
/// `chat.*.x` lie within `chat.>`; `chat.>` does not lie within `chat.*`, nor `chat.*`
/// within `chat.room1`.
pub fn pattern_contains(outer: &str, inner: &str) -> bool {
    let mut inner_segments = inner.split('.');
    for segment in outer.split('.') {
        let Some(within) = inner_segments.next() else {
            // `outer` needs more segments than `inner` has.
            return false;
        };
        match segment {
            ">" => return true,
            "*" if within != ">" => {}
            "*" => return false,
            literal if literal == within && within != "*" && within != ">" => {}
            _ => return false,
        }
    }
    inner_segments.next().is_none()
}

/// Checks the syntax of a pattern a token is granted: a pattern as subscriptions use
/// (wildcards allowed in `_bus_` too, whose inboxes a grant may cover as a whole) or `>`
/// alone, every subject.
pub fn check_grant_pattern(text: &str) -> Result<(), SubjectError> {
    if text == ">" {
        return Ok(());
    }
    check(text, true)
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn namespace_of(text: &str) -> &str {
    text.split('.').next().unwrap_or(text)
}

fn error(text: &str, reason: &'static str) -> SubjectError {
    SubjectError {
        subject: text.to_owned(),
        reason,
    }
}

/// Letters and digits of any script (as the reference accepts), `_` and `-`.
fn is_segment_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

fn check(text: &str, wildcards: bool) -> Result<(), SubjectError> {
    if text.is_empty() {
        return Err(error(text, "it is empty"));
    }
    if text.starts_with('.') || text.ends_with('.') {
        return Err(error(text, "it starts or ends with a dot"));
    }
    if !text.contains('.') {
        return Err(error(
            text,
            "it needs a namespace and at least one more segment, like orders.created",
        ));
    }
    // Walked without collecting the segments first (this runs for every publish).
    let mut segments = text.split('.').enumerate().peekable();
    while let Some((i, segment)) = segments.next() {
        let is_last = segments.peek().is_none();
        if segment.is_empty() {
            return Err(error(text, "it has an empty segment (two dots in a row)"));
        }
        if segment == "*" || segment == ">" {
            if !wildcards {
                return Err(error(
                    text,
                    "wildcards (* and >) are for subscribing, not publishing",
                ));
            }
            if i == 0 {
                return Err(error(
                    text,
                    "the namespace (first segment) cannot be a wildcard",
                ));
            }
            if segment == ">" && !is_last {
                return Err(error(text, "> may only be the last segment"));
            }
            continue;
        }
        // ASCII first (cheap); then any script. A valid segment holds no * or >.
        let valid = segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            || segment.chars().all(is_segment_char);
        if valid {
            continue;
        }
        if segment.contains(['*', '>']) {
            return Err(error(
                text,
                "* and > must stand alone in a segment (a.* is valid, a.b* is not)",
            ));
        }
        return Err(error(
            text,
            "segments may contain only letters, digits, '_' and '-'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, subject: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(subject)
    }

    #[test]
    fn valid_and_invalid_subjects() {
        for good in [
            "a.b",
            "orders.eu-1.created",
            "a_b.c-d.E9",
            "_bus_.abc",
            "app.café",
            "app.注文",
        ] {
            assert!(Subject::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a",
            ".a.b",
            "a.b.",
            "a..b",
            "a.b c",
            "a.b\n",
            "a.*",
            "a.>",
            "a.b*",
            "a.b/c",
            "a.b\u{a0}c",
            "a.b\u{200b}",
        ] {
            assert!(Subject::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Subject::parse("orders.x").unwrap().namespace(), "orders");
        assert!(Subject::parse("_bus_.x").unwrap().is_inbox());
    }

    #[test]
    fn valid_and_invalid_patterns() {
        for good in ["a.*", "a.>", "a.*.c", "a.*.>", "a.b", "_bus_.x"] {
            assert!(Pattern::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "*.a", ">.a", "a.>.b", "a.b*", "a.**", "a.*b", "a", "a..*", "_bus_.*", "_bus_.>", "*",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn containment_of_patterns() {
        for (outer, inner) in [
            ("chat.>", "chat.room1"),
            ("chat.>", "chat.*.x"),
            ("chat.>", "chat.>"),
            ("chat.>", "chat.*"),
            ("chat.*", "chat.*"),
            ("chat.*", "chat.room1"),
            ("chat.*.x", "chat.a.x"),
            ("chat.*.>", "chat.*.x.>"),
            ("chat.room1", "chat.room1"),
            (">", "chat.>"),
            (">", "_bus_.abc"),
            ("_bus_.>", "_bus_.abc"),
        ] {
            assert!(pattern_contains(outer, inner), "{inner} within {outer}");
        }
        for (outer, inner) in [
            ("chat.*", "chat.>"),
            ("chat.room1", "chat.>"),
            ("chat.room1", "chat.*"),
            ("chat.room1", "chat.room2"),
            ("chat.room1", "chat.room1.x"),
            ("chat.room1.x", "chat.room1"),
            ("chat.>", "chat"),
            ("chat.>", "orders.x"),
            ("chat.*.>", "chat.>"),
            ("chat.*.x", "chat.*.*"),
            ("chat.*", "chat.a.b"),
        ] {
            assert!(
                !pattern_contains(outer, inner),
                "{inner} not within {outer}"
            );
        }
    }

    #[test]
    fn grant_patterns() {
        for good in [">", "a.>", "a.*.b", "_bus_.>", "_bus_.x"] {
            assert!(check_grant_pattern(good).is_ok(), "{good}");
        }
        for bad in ["", "*", "a", "*.>", ">.a", "a.b*", "a..b"] {
            assert!(check_grant_pattern(bad).is_err(), "{bad:?} accepted");
        }
    }

    mod containment {
        use super::super::*;
        use proptest::prelude::*;

        /// A pattern over a small alphabet, so that generated subjects often match it:
        /// a namespace `a` or `b`, then one to four segments of `a`, `b`, `*`, and
        /// maybe `>` last.
        fn pattern() -> impl Strategy<Value = String> {
            let namespace = prop_oneof![Just("a"), Just("b")];
            let segment = prop_oneof![Just("a"), Just("b"), Just("*")];
            (
                namespace,
                proptest::collection::vec(segment, 0..4),
                any::<bool>(),
            )
                .prop_filter_map("a pattern needs two segments", |(ns, rest, tail)| {
                    let mut segments = vec![ns];
                    segments.extend(rest);
                    if tail {
                        segments.push(">");
                    }
                    (segments.len() >= 2).then(|| segments.join("."))
                })
        }

        fn subject() -> impl Strategy<Value = String> {
            let segment = prop_oneof![Just("a"), Just("b"), Just("c")];
            proptest::collection::vec(segment, 2..7).prop_map(|s| s.join("."))
        }

        /// Subjects that `pattern` matches, with `*` and `>` taken by a segment no
        /// generated pattern names (`z`), and `>` by one to `max_tail` of them.
        fn instances(pattern: &str, max_tail: usize) -> Vec<String> {
            let fixed: Vec<&str> = pattern
                .split('.')
                .map(|s| if s == "*" { "z" } else { s })
                .collect();
            match fixed.last() {
                Some(&">") => (1..=max_tail)
                    .map(|n| {
                        let mut segments = fixed[..fixed.len() - 1].to_vec();
                        segments.extend(std::iter::repeat_n("z", n));
                        segments.join(".")
                    })
                    .collect(),
                _ => vec![fixed.join(".")],
            }
        }

        proptest! {
            /// Sound: when containment says yes, every subject the inner pattern
            /// matches is matched by the outer one (by the matcher subscriptions use).
            #[test]
            fn containment_agrees_with_the_matcher(
                outer in pattern(),
                inner in pattern(),
                subjects in proptest::collection::vec(subject(), 1..40),
            ) {
                let (o, i) = (Pattern::parse(&outer).unwrap(), Pattern::parse(&inner).unwrap());
                let contained = pattern_contains(&outer, &inner);
                for s in subjects.iter().map(String::as_str).chain(instances(&inner, 6).iter().map(String::as_str)) {
                    if contained && i.matches(s) {
                        prop_assert!(o.matches(s), "{inner} within {outer}, but {s} matches only the inner one");
                    }
                }
                // Complete: when it says no, some subject shows it.
                if !contained {
                    let witness = instances(&inner, outer.split('.').count() + 1)
                        .into_iter()
                        .find(|s| i.matches(s) && !o.matches(s));
                    prop_assert!(witness.is_some(), "{inner} not within {outer}, but no subject shows it");
                }
                // A grant of `>` holds everything.
                prop_assert!(pattern_contains(">", &inner));
                // A subject is matched by a pattern exactly when it lies within it.
                for s in &subjects {
                    prop_assert_eq!(pattern_contains(&outer, s), o.matches(s));
                }
            }
        }
    }

    #[test]
    fn wildcard_semantics() {
        assert!(matches("a.*", "a.b"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(!matches("a.*", "b.c"));
        assert!(matches("a.>", "a.b"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "b.b"));
        assert!(matches("a.*.c", "a.x.c"));
        assert!(!matches("a.*.c", "a.x.d"));
        assert!(!matches("a.*.c", "a.x.c.d"));
        assert!(matches("a.*.>", "a.x.y.z"));
        assert!(!matches("a.*.>", "a.x"));
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.bc"));
        assert!(!matches("a.b", "a.b.c"));
    }
}
