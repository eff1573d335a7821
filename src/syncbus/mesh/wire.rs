//! The mesh's datagrams, as bytes. Every datagram starts with the magic `BM`, the
//! version, its kind and the sender's id (random per process start); integers are
//! big-endian, texts a `u16` length and UTF-8 (length `0xFFFF`: absent).
//!
//! - `Heartbeat`: the receiver's id if known (else 0), the sender's zone and the address
//!   it advertises, and the members it knows (id, address, zone) for the receiver to
//!   learn by gossip.
//! - `Data`: reliable items for one receiver: its id, the datagram's sequence number (per
//!   sender and receiver, from 1), the sender's floor (every number up to it is
//!   acknowledged), then the items: invalidations (with the request id of a quorum wait,
//!   or 0) and the deliveries that answer such waits.
//! - `Ack`: the sequence numbers of `Data` received, for the receiver's id.

use std::net::SocketAddr;

use crate::syncbus::{PublishOptions, SyncEvent};

const MAGIC: &[u8; 2] = b"BM";
const VERSION: u8 = 1;

/// The largest datagram the mesh sends: what fits an IPv6 path's minimum MTU (1280 bytes)
/// after IP and UDP headers, so that nothing depends on IP fragmentation.
pub(crate) const MAX_DATAGRAM: usize = 1200;

/// Bytes before the items of a `Data` datagram.
pub(crate) const DATA_HEADER: usize = 4 + 8 + 8 + 8 + 8;

/// Bytes of an invalidation item besides its key, region and scope.
const INVALIDATION_OVERHEAD: usize = 1 + 1 + 8 + 2 + 2 + 2;

/// The most bytes of key, region and scope together one invalidation can carry.
pub(crate) const MAX_EVENT_TEXT: usize = MAX_DATAGRAM - DATA_HEADER - INVALIDATION_OVERHEAD;

const HEARTBEAT: u8 = 1;
const DATA: u8 = 2;
const ACK: u8 = 3;

const INVALIDATION: u8 = 1;
const DELIVERED: u8 = 2;

const ABSENT: u16 = u16::MAX;

/// A node as heartbeats describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    pub(crate) zone: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Datagram {
    Heartbeat {
        from: u64,
        to: u64,
        zone: String,
        advertise: SocketAddr,
        members: Vec<Peer>,
    },
    Data {
        from: u64,
        to: u64,
        seq: u64,
        floor: u64,
        items: Vec<Item>,
    },
    Ack {
        from: u64,
        to: u64,
        seqs: Vec<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    /// An invalidation of a key (`kind` `k`) or a lease revocation (`l`); `request` is
    /// the quorum wait it answers to, or 0.
    Invalidation {
        kind: u8,
        request: u64,
        event: SyncEvent,
    },
    /// `subscriptions` in `zone` were handed the invalidation of `request`.
    Delivered {
        request: u64,
        subscriptions: u32,
        zone: String,
    },
}

fn header(kind: u8, from: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&from.to_be_bytes());
}

fn text(value: Option<&str>, out: &mut Vec<u8>) {
    match value {
        // Callers bound texts well below u16::MAX (a datagram is 1200 bytes).
        Some(value) => {
            out.extend_from_slice(&(value.len() as u16).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        None => out.extend_from_slice(&ABSENT.to_be_bytes()),
    }
}

/// The bytes of `item`.
pub(crate) fn encode_item(item: &Item) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match item {
        Item::Invalidation {
            kind,
            request,
            event,
        } => {
            out.push(INVALIDATION);
            out.push(*kind);
            out.extend_from_slice(&request.to_be_bytes());
            text(Some(&event.key), &mut out);
            text(event.options.region.as_deref(), &mut out);
            text(event.options.scope.as_deref(), &mut out);
        }
        Item::Delivered {
            request,
            subscriptions,
            zone,
        } => {
            out.push(DELIVERED);
            out.extend_from_slice(&request.to_be_bytes());
            out.extend_from_slice(&subscriptions.to_be_bytes());
            text(Some(zone), &mut out);
        }
    }
    out
}

/// A `Data` datagram of items already encoded by [`encode_item`].
pub(crate) fn encode_data(from: u64, to: u64, seq: u64, floor: u64, items: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DATA_HEADER + items.len());
    header(DATA, from, &mut out);
    out.extend_from_slice(&to.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&floor.to_be_bytes());
    out.extend_from_slice(items);
    out
}

pub(crate) fn encode_ack(from: u64, to: u64, seqs: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 + 8 + 2 + 8 * seqs.len());
    header(ACK, from, &mut out);
    out.extend_from_slice(&to.to_be_bytes());
    out.extend_from_slice(&(seqs.len() as u16).to_be_bytes());
    for seq in seqs {
        out.extend_from_slice(&seq.to_be_bytes());
    }
    out
}

/// The most sequence numbers one `Ack` carries.
pub(crate) const MAX_ACKS: usize = (MAX_DATAGRAM - 4 - 8 - 8 - 2) / 8;

/// A heartbeat with as many of `members` as fit one datagram (the caller rotates them).
pub(crate) fn encode_heartbeat(
    from: u64,
    to: u64,
    zone: &str,
    advertise: SocketAddr,
    members: &[Peer],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    header(HEARTBEAT, from, &mut out);
    out.extend_from_slice(&to.to_be_bytes());
    text(Some(zone), &mut out);
    text(Some(&advertise.to_string()), &mut out);
    let count_at = out.len();
    out.extend_from_slice(&0u16.to_be_bytes());
    let mut count = 0u16;
    for member in members {
        let addr = member.addr.to_string();
        if out.len() + 8 + 4 + addr.len() + member.zone.len() > MAX_DATAGRAM {
            break;
        }
        out.extend_from_slice(&member.id.to_be_bytes());
        text(Some(&addr), &mut out);
        text(Some(&member.zone), &mut out);
        count += 1;
    }
    out[count_at..count_at + 2].copy_from_slice(&count.to_be_bytes());
    out
}

/// Reads a datagram; `None` if it is not one of ours or is malformed.
pub(crate) fn decode(bytes: &[u8]) -> Option<Datagram> {
    let mut r = Reader(bytes);
    if r.take(2)? != MAGIC || r.u8()? != VERSION {
        return None;
    }
    let kind = r.u8()?;
    let from = r.u64()?;
    let datagram = match kind {
        HEARTBEAT => {
            let to = r.u64()?;
            let zone = r.text()?;
            let advertise = r.text()?.parse().ok()?;
            let count = r.u16()?;
            let mut members = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let id = r.u64()?;
                let addr = r.text()?.parse().ok()?;
                let zone = r.text()?;
                members.push(Peer { id, addr, zone });
            }
            Datagram::Heartbeat {
                from,
                to,
                zone,
                advertise,
                members,
            }
        }
        DATA => {
            let (to, seq, floor) = (r.u64()?, r.u64()?, r.u64()?);
            let mut items = Vec::new();
            while !r.0.is_empty() {
                items.push(r.item()?);
            }
            Datagram::Data {
                from,
                to,
                seq,
                floor,
                items,
            }
        }
        ACK => {
            let to = r.u64()?;
            let count = r.u16()?;
            let seqs = (0..count).map(|_| r.u64()).collect::<Option<_>>()?;
            Datagram::Ack { from, to, seqs }
        }
        _ => return None,
    };
    r.0.is_empty().then_some(datagram)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn optional_text(&mut self) -> Option<Option<String>> {
        let len = self.u16()?;
        if len == ABSENT {
            return Some(None);
        }
        let bytes = self.take(usize::from(len))?;
        Some(Some(std::str::from_utf8(bytes).ok()?.to_owned()))
    }

    fn text(&mut self) -> Option<String> {
        self.optional_text()?
    }

    fn item(&mut self) -> Option<Item> {
        match self.u8()? {
            INVALIDATION => {
                let kind = self.u8()?;
                let request = self.u64()?;
                let key = self.text()?;
                let region = self.optional_text()?;
                let scope = self.optional_text()?;
                Some(Item::Invalidation {
                    kind,
                    request,
                    event: SyncEvent {
                        key,
                        options: PublishOptions { region, scope },
                    },
                })
            }
            DELIVERED => {
                let request = self.u64()?;
                let subscriptions = self.u32()?;
                let zone = self.text()?;
                Some(Item::Delivered {
                    request,
                    subscriptions,
                    zone,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_read_back_as_written() {
        let invalidation = Item::Invalidation {
            kind: b'k',
            request: 7,
            event: SyncEvent {
                key: "user:42/ü".into(),
                options: PublishOptions {
                    region: Some("eu".into()),
                    scope: None,
                },
            },
        };
        let delivered = Item::Delivered {
            request: 7,
            subscriptions: 2,
            zone: "us".into(),
        };
        let mut items = encode_item(&invalidation);
        items.extend(encode_item(&delivered));
        assert_eq!(
            decode(&encode_data(1, 2, 3, 2, &items)),
            Some(Datagram::Data {
                from: 1,
                to: 2,
                seq: 3,
                floor: 2,
                items: vec![invalidation, delivered],
            })
        );
        assert_eq!(
            decode(&encode_ack(2, 1, &[3, 4])),
            Some(Datagram::Ack {
                from: 2,
                to: 1,
                seqs: vec![3, 4]
            })
        );
        let members: Vec<Peer> = (0..100)
            .map(|id| Peer {
                id,
                addr: "127.0.0.1:7946".parse().unwrap(),
                zone: "eu".into(),
            })
            .collect();
        let heartbeat = encode_heartbeat(1, 0, "eu", "10.0.0.1:7946".parse().unwrap(), &members);
        assert!(heartbeat.len() <= MAX_DATAGRAM);
        let Some(Datagram::Heartbeat {
            members: told,
            advertise,
            ..
        }) = decode(&heartbeat)
        else {
            panic!("not a heartbeat");
        };
        assert_eq!(advertise.to_string(), "10.0.0.1:7946");
        assert!(told.len() > 20 && told[..] == members[..told.len()]);
    }

    #[test]
    fn foreign_or_cut_datagrams_are_refused() {
        let ack = encode_ack(2, 1, &[3, 4]);
        for cut in 0..ack.len() {
            assert_eq!(decode(&ack[..cut]), None);
        }
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), None);
        let mut longer = ack.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
    }
}
