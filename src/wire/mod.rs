//! What crosses the wire between a bus server and its clients, defined once: the server's
//! HTTP layer, the `bus` tools and the client SDK all read and write these.
//!
//! - [`events`]: an event's JSON as a publisher sends it ([`EventIn`]) and as the server
//!   streams and dumps it ([`EventOut`]); what an `event: skipped` frame says ([`Skipped`]).
//! - [`headers`]: the names of the `X-BUS-*` headers.
//! - [`consumers`]: the durable-consumer listing ([`ConsumerInfo`]).
//! - [`namespaces`]: what a namespace holds and who reads it ([`NamespaceInfo`]).
//! - [`param`]: query parameter names and the encodings of their values ([`StartParam`],
//!   [`AckParam`], [`MaxDeliveries`]).
//!
//! A leaf beside [`crate::timestamp`] and [`crate::duration`]: it does no I/O and imports
//! nothing of the server or the client, so either side builds without the other (it is
//! part of the `client` feature). The contract itself is described in `HTTP_API.md`.
#![warn(missing_docs)]

pub mod consumers;
pub mod events;
pub mod headers;
pub mod namespaces;
pub mod param;

pub use self::consumers::ConsumerInfo;
pub use self::events::{EventIn, EventOut, Skipped, GO_ZERO_TIME};
pub use self::headers::*;
pub use self::namespaces::NamespaceInfo;
pub use self::param::{AckParam, MaxDeliveries, ParamError, StartParam};
