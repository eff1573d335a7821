//! The names of the HTTP headers the bus adds to the standard ones, lower-case as HTTP/2
//! and our HTTP libraries write them (names are case-insensitive; the reference server
//! and its docs spell them `X-BUS-…`).

/// The id of a published event (of a batch's last event).
pub const HEADER_EVENT_ID: &str = "x-bus-event-id";
/// The creation time (RFC 3339) of a published event (of a batch's last event).
pub const HEADER_EVENT_CREATED_AT: &str = "x-bus-event-created-at";
/// The log position of a published event (of a batch's last event; -1 for inboxes).
pub const HEADER_EVENT_INDEX: &str = "x-bus-event-index";
/// The id of a subscription's consumer, which its acks name (`consumer_id=`).
pub const HEADER_CONSUMER_ID: &str = "x-bus-consumer-id";
/// How many distinct consumers confirmed an event (`POST /?confirm=N`).
pub const HEADER_CONFIRMED: &str = "x-bus-confirmed";
/// How many distinct zones they were in (`POST /?confirm_zones=K`).
pub const HEADER_CONFIRMED_ZONES: &str = "x-bus-confirmed-zones";
/// The standard Server-Sent Events header with which a reconnecting subscriber says the
/// last event it received; the stream resumes after it.
pub const HEADER_LAST_EVENT_ID: &str = "last-event-id";

/// The bus's headers that browsers on other origins may send (CORS
/// `Access-Control-Allow-Headers`), as the reference lists them.
pub const CORS_REQUEST_HEADERS: [&str; 4] = [
    HEADER_EVENT_ID,
    HEADER_EVENT_CREATED_AT,
    HEADER_EVENT_INDEX,
    HEADER_CONSUMER_ID,
];

/// The bus's headers that browsers on other origins may read (CORS
/// `Access-Control-Expose-Headers`): every one a response carries.
pub const CORS_RESPONSE_HEADERS: [&str; 6] = [
    HEADER_EVENT_ID,
    HEADER_EVENT_CREATED_AT,
    HEADER_EVENT_INDEX,
    HEADER_CONSUMER_ID,
    HEADER_CONFIRMED,
    HEADER_CONFIRMED_ZONES,
];
