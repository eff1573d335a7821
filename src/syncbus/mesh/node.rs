//! A mesh node: its UDP socket, the members it knows, and reliable delivery to each.
//!
//! Membership: a node heartbeats every member it knows, its static peers and (if set) a
//! multicast group; a heartbeat lists the members the sender knows, so a node that
//! contacts any one learns the rest. A member is live once heard from directly, and
//! dropped when nothing came from it for `dead_after`.
//!
//! Delivery: each published item is queued for every live member. Per member, items are
//! packed into `Data` datagrams numbered from 1; at most [`WINDOW`] are unacknowledged
//! at a time, and one unacknowledged past its retransmission timeout (RFC 6298's from the
//! measured round trips, at least 20 ms, doubling per try) is sent again. Receivers acknowledge
//! every `Data` datagram (in `Ack`s gathered per burst of datagrams read) and remember
//! which numbers they have had, so a datagram sent twice is handed to the application
//! once. The price of reliability is an `Ack` per burst per sender, the retransmissions
//! of what was lost, and, per pair of members, a window of unacknowledged datagrams.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::wire::{self, Datagram, Item, Peer, DATA_HEADER, MAX_ACKS, MAX_DATAGRAM};
use crate::syncbus::dispatch::Subscribers;
use crate::syncbus::{AbortOnDrop, SyncError};

/// Unacknowledged `Data` datagrams per member before more wait.
const WINDOW: usize = 64;
/// Items queued for one member before publishes wait for room.
const MAX_QUEUE: usize = 1 << 16;
/// `Data` datagrams read in one burst between two rounds of acknowledgements.
const ACK_EVERY: usize = 16;
/// How often retransmissions and expiries are looked at.
const TICK: Duration = Duration::from_millis(5);
const MIN_RTO: Duration = Duration::from_millis(20);
const MAX_RTO: Duration = Duration::from_secs(1);
/// The retransmission timeout before any round trip was measured.
const FIRST_RTO: Duration = Duration::from_millis(50);

/// How a node runs (see `MeshOptions`, which it is made from).
pub(crate) struct Config {
    pub(crate) bind: SocketAddr,
    pub(crate) peers: Vec<String>,
    pub(crate) multicast: Option<(Ipv4Addr, Ipv4Addr)>,
    pub(crate) advertise: Option<SocketAddr>,
    pub(crate) heartbeat: Duration,
    pub(crate) dead_after: Duration,
    pub(crate) zone: String,
    pub(crate) loss: f64,
}

/// A running node: its tasks stop when the last handle and subscription let go of it.
pub(crate) struct Node {
    pub(crate) inner: Arc<Inner>,
    _tasks: [AbortOnDrop; 2],
}

pub(crate) struct Inner {
    pub(crate) id: u64,
    pub(crate) zone: String,
    socket: UdpSocket,
    advertise: SocketAddr,
    multicast: Option<SocketAddr>,
    static_peers: Vec<String>,
    heartbeat: Duration,
    dead_after: Duration,
    state: Mutex<State>,
    pub(crate) subscribers: Arc<Subscribers>,
    /// Wakes the sender: items were queued, or acknowledgements opened a window.
    wake: Notify,
    /// Wakes publishes waiting for queue room.
    room: Notify,
    pub(crate) published: AtomicU64,
    pub(crate) counts: Counts,
    /// The share of outgoing datagrams dropped on purpose (tests), and the state of the
    /// generator that decides which.
    loss: f64,
    dice: AtomicU64,
}

/// What the node sent, by kind, for [`super::MeshStats`].
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) data: AtomicU64,
    pub(crate) retransmitted: AtomicU64,
    pub(crate) acks: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    members: HashMap<u64, Member>,
    /// What each sender's `Data` numbers this node has had.
    received: HashMap<u64, Received>,
    /// Quorum waits by request id.
    waits: HashMap<u64, Wait>,
    next_request: u64,
    /// Acknowledgements to send at the end of the burst being read, by member.
    acks: HashMap<u64, (SocketAddr, Vec<u64>)>,
}

struct Member {
    addr: SocketAddr,
    zone: String,
    last_heard: Instant,
    /// Heard from directly (not only named by another's heartbeat).
    live: bool,
    queue: VecDeque<Arc<[u8]>>,
    next_seq: u64,
    unacked: BTreeMap<u64, Sent>,
    /// The smoothed round trip and its variation (RFC 6298), once measured.
    rtt: Option<(Duration, Duration)>,
}

struct Sent {
    items: Vec<u8>,
    sent_at: Instant,
    tries: u32,
}

struct Received {
    /// Every number up to it has been had.
    floor: u64,
    above: BTreeSet<u64>,
    last_heard: Instant,
}

#[derive(Default)]
struct Wait {
    subscriptions: usize,
    zones: HashSet<String>,
    changed: Arc<Notify>,
}

impl Member {
    fn new(addr: SocketAddr, zone: String, live: bool) -> Member {
        Member {
            addr,
            zone,
            last_heard: Instant::now(),
            live,
            queue: VecDeque::new(),
            next_seq: 1,
            unacked: BTreeMap::new(),
            rtt: None,
        }
    }

    /// Every number up to it has been acknowledged.
    fn floor(&self) -> u64 {
        self.unacked
            .keys()
            .next()
            .map_or(self.next_seq - 1, |first| first - 1)
    }
}

fn backend(e: impl std::fmt::Display) -> SyncError {
    SyncError::Backend(format!("mesh: {e}"))
}

/// The dispatch channel of a key (`k`) or lease (`l`): local to the node, so the key
/// as it is.
pub(crate) fn channel(kind: u8, key: &str) -> String {
    let mut channel = String::with_capacity(1 + key.len());
    channel.push(char::from(kind));
    channel.push_str(key);
    channel
}

impl Node {
    pub(crate) async fn start(
        config: Config,
        subscribers: Arc<Subscribers>,
    ) -> Result<Node, SyncError> {
        let socket = UdpSocket::bind(config.bind)
            .await
            .map_err(|e| backend(format!("binding UDP {}: {e}", config.bind)))?;
        let local = socket.local_addr().map_err(backend)?;
        let multicast = match config.multicast {
            Some((group, interface)) => {
                socket
                    .join_multicast_v4(group, interface)
                    .map_err(|e| backend(format!("joining multicast group {group}: {e}")))?;
                Some(SocketAddr::from((group, local.port())))
            }
            None => None,
        };
        let inner = Arc::new(Inner {
            id: crate::random::number().max(1),
            zone: config.zone,
            socket,
            advertise: config.advertise.unwrap_or(local),
            multicast,
            static_peers: config.peers,
            heartbeat: config.heartbeat,
            dead_after: config.dead_after,
            state: Mutex::default(),
            subscribers,
            wake: Notify::new(),
            room: Notify::new(),
            published: AtomicU64::new(0),
            counts: Counts::default(),
            loss: config.loss,
            dice: AtomicU64::new(crate::random::number()),
        });
        let receiver = tokio::spawn(Arc::clone(&inner).receive());
        let sender = tokio::spawn(Arc::clone(&inner).send());
        Ok(Node {
            inner,
            _tasks: [AbortOnDrop(receiver), AbortOnDrop(sender)],
        })
    }

    pub(crate) fn is_running(&self) -> bool {
        self._tasks.iter().all(|task| !task.0.is_finished())
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn local_addr(&self) -> Result<SocketAddr, SyncError> {
        self.socket.local_addr().map_err(backend)
    }

    /// The live members' addresses, sorted.
    pub(crate) fn peers(&self) -> Vec<String> {
        let mut peers: Vec<String> = self
            .lock()
            .members
            .values()
            .filter(|m| m.live)
            .map(|m| m.addr.to_string())
            .collect();
        peers.sort();
        peers.dedup();
        peers
    }

    /// Queues `item` for every live member and wakes the sender; waits while a member's
    /// queue is full (for `timeout` at most).
    pub(crate) async fn broadcast(&self, item: &Item, timeout: Duration) -> Result<(), SyncError> {
        let bytes: Arc<[u8]> = wire::encode_item(item).into();
        let deadline = Instant::now() + timeout;
        loop {
            let room = self.room.notified();
            {
                let mut state = self.lock();
                let live = || state.members.values().filter(|m| m.live);
                if live().all(|m| m.queue.len() < MAX_QUEUE) {
                    for member in state.members.values_mut().filter(|m| m.live) {
                        member.queue.push_back(Arc::clone(&bytes));
                    }
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(SyncError::Timeout(timeout));
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// A new quorum wait, registered before its invalidation goes out.
    pub(crate) fn wait(&self) -> (u64, Arc<Notify>) {
        let mut state = self.lock();
        state.next_request += 1;
        let request = state.next_request;
        let wait = Wait::default();
        let changed = Arc::clone(&wait.changed);
        state.waits.insert(request, wait);
        (request, changed)
    }

    /// Counts `subscriptions` in `zone` for `request`, if it is still waited for.
    pub(crate) fn count(&self, request: u64, subscriptions: usize, zone: &str) {
        if subscriptions == 0 {
            return;
        }
        let mut state = self.lock();
        if let Some(wait) = state.waits.get_mut(&request) {
            wait.subscriptions += subscriptions;
            wait.zones.insert(zone.to_owned());
            wait.changed.notify_one();
        }
    }

    /// The counts of `request` so far: (subscriptions, zones).
    pub(crate) fn counted(&self, request: u64) -> (usize, usize) {
        self.lock()
            .waits
            .get(&request)
            .map_or((0, 0), |w| (w.subscriptions, w.zones.len()))
    }

    pub(crate) fn end_wait(&self, request: u64) {
        self.lock().waits.remove(&request);
    }

    /// Sends `bytes` to `to`, unless the simulated loss drops it. A full socket buffer
    /// loses it too: the retransmissions are there for that.
    fn transmit(&self, bytes: &[u8], to: SocketAddr) {
        if self.loss > 0.0 {
            // splitmix64: enough randomness to decide a drop.
            let mut z = self
                .dice
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
                .wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if (z >> 11) as f64 / (1u64 << 53) as f64 <= self.loss {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let _ = self.socket.try_send_to(bytes, to);
    }

    /// Reads datagrams, a burst at a time, and acknowledges each burst's `Data`.
    async fn receive(self: Arc<Self>) {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let Ok((n, from)) = self.socket.recv_from(&mut buffer).await else {
                // An ICMP error of an earlier send (Linux reports them here): go on.
                continue;
            };
            self.handle(&buffer[..n], from).await;
            let mut read = 1;
            while let Ok((n, from)) = self.socket.try_recv_from(&mut buffer) {
                self.handle(&buffer[..n], from).await;
                read += 1;
                // A long burst acknowledges as it goes: the senders' round trips stay
                // what the network makes them.
                if read % ACK_EVERY == 0 {
                    self.send_acks();
                }
            }
            self.send_acks();
        }
    }

    fn send_acks(&self) {
        let acks = std::mem::take(&mut self.lock().acks);
        for (member, (addr, seqs)) in acks {
            for chunk in seqs.chunks(MAX_ACKS) {
                self.counts.acks.fetch_add(1, Ordering::Relaxed);
                self.transmit(&wire::encode_ack(self.id, member, chunk), addr);
            }
        }
    }

    async fn handle(&self, bytes: &[u8], source: SocketAddr) {
        let Some(datagram) = wire::decode(bytes) else {
            return;
        };
        match datagram {
            Datagram::Heartbeat {
                from,
                zone,
                advertise,
                members,
                ..
            } => self.heard(from, zone, advertise, source, members),
            Datagram::Ack { from, to, seqs } if to == self.id => self.acknowledged(from, &seqs),
            Datagram::Data {
                from,
                to,
                seq,
                floor,
                items,
            } if to == self.id && self.received(from, source, seq, floor) => {
                self.deliver(from, items).await;
            }
            // For an earlier run of this node, or its own echo from a multicast group.
            _ => {}
        }
    }

    /// A heartbeat from `from`: it is live, and so may be the members it names.
    fn heard(
        &self,
        from: u64,
        zone: String,
        advertise: SocketAddr,
        source: SocketAddr,
        named: Vec<Peer>,
    ) {
        if from == self.id {
            return;
        }
        // A node bound to every interface advertises no address of its own: it is
        // where its datagrams come from.
        let addr = if advertise.ip().is_unspecified() {
            SocketAddr::new(source.ip(), advertise.port())
        } else {
            advertise
        };
        let greet = {
            let mut state = self.lock();
            // Another id at the same address is an earlier run of the same node.
            state.members.retain(|id, m| *id == from || m.addr != addr);
            let member = state
                .members
                .entry(from)
                .or_insert_with(|| Member::new(addr, zone.clone(), false));
            let greet = !member.live;
            member.live = true;
            member.addr = addr;
            member.zone = zone;
            member.last_heard = Instant::now();
            for peer in named {
                // This node under an earlier id (it restarted) is not a member either.
                let known = peer.addr == self.advertise
                    || state.members.values().any(|m| m.addr == peer.addr);
                if peer.id != self.id && !known {
                    state
                        .members
                        .entry(peer.id)
                        .or_insert_with(|| Member::new(peer.addr, peer.zone, false));
                }
            }
            greet
        };
        // A member new to this node hears from it at once rather than at the next beat.
        if greet {
            self.heartbeat_to(from, addr, &self.gossip());
        }
    }

    fn acknowledged(&self, from: u64, seqs: &[u64]) {
        let now = Instant::now();
        {
            let mut state = self.lock();
            let Some(member) = state.members.get_mut(&from) else {
                return;
            };
            member.last_heard = now;
            for seq in seqs {
                if let Some(sent) = member.unacked.remove(seq) {
                    // Karn: only a datagram sent once measures the round trip.
                    if sent.tries == 1 {
                        let sample = now.duration_since(sent.sent_at);
                        member.rtt = Some(match member.rtt {
                            Some((srtt, rttvar)) => {
                                let deviation = srtt.abs_diff(sample);
                                ((srtt * 7 + sample) / 8, (rttvar * 3 + deviation) / 4)
                            }
                            None => (sample, sample / 2),
                        });
                    }
                }
            }
        }
        self.wake.notify_one();
    }

    /// Notes `Data` number `seq` from `from` and queues its acknowledgement; whether it
    /// is new (else it was had before, and its acknowledgement was lost).
    fn received(&self, from: u64, source: SocketAddr, seq: u64, floor: u64) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        let addr = match state.members.get_mut(&from) {
            Some(member) => {
                member.last_heard = now;
                member.addr
            }
            None => source,
        };
        state
            .acks
            .entry(from)
            .or_insert_with(|| (addr, Vec::new()))
            .1
            .push(seq);
        let received = state.received.entry(from).or_insert_with(|| Received {
            floor: 0,
            above: BTreeSet::new(),
            last_heard: now,
        });
        received.last_heard = now;
        // What the sender knows acknowledged was had (possibly before this node forgot
        // the sender): nothing below it needs remembering.
        if floor > received.floor {
            received.floor = floor;
            received.above = received.above.split_off(&(floor + 1));
        }
        if seq <= received.floor || !received.above.insert(seq) {
            return false;
        }
        while received.above.first() == Some(&(received.floor + 1)) {
            received.above.pop_first();
            received.floor += 1;
        }
        true
    }

    /// Hands `items` from `from` to this node's subscriptions, answering quorum waits.
    async fn deliver(&self, from: u64, items: Vec<Item>) {
        for item in items {
            match item {
                Item::Invalidation {
                    kind,
                    request,
                    event,
                } => {
                    let handed = self
                        .subscribers
                        .deliver(&channel(kind, &event.key), &event)
                        .await;
                    if request != 0 && handed > 0 {
                        let answer = Item::Delivered {
                            request,
                            subscriptions: u32::try_from(handed).unwrap_or(u32::MAX),
                            zone: self.zone.clone(),
                        };
                        self.send_to(from, &answer);
                    }
                }
                Item::Delivered {
                    request,
                    subscriptions,
                    zone,
                } => self.count(request, subscriptions as usize, &zone),
            }
        }
    }

    /// Queues `item` for member `to` alone (if it is still a member).
    fn send_to(&self, to: u64, item: &Item) {
        let bytes: Arc<[u8]> = wire::encode_item(item).into();
        if let Some(member) = self.lock().members.get_mut(&to) {
            member.queue.push_back(bytes);
        }
        self.wake.notify_one();
    }

    /// Sends what is queued as soon as it is, retransmits, heartbeats and expires.
    async fn send(self: Arc<Self>) {
        let mut next_tick = Instant::now();
        let mut next_heartbeat = Instant::now();
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(next_tick) => {}
            }
            let now = Instant::now();
            self.send_queued(now);
            if now >= next_tick {
                next_tick = now + TICK;
                self.retransmit(now);
            }
            if now >= next_heartbeat {
                next_heartbeat = now + self.heartbeat;
                self.expire(now);
                self.heartbeats().await;
            }
        }
    }

    fn send_queued(&self, now: Instant) {
        let mut room = false;
        {
            let mut state = self.lock();
            for (&id, member) in state.members.iter_mut().filter(|(_, m)| m.live) {
                let was_full = member.queue.len() >= MAX_QUEUE;
                while member.unacked.len() < WINDOW && !member.queue.is_empty() {
                    let mut items = Vec::with_capacity(MAX_DATAGRAM - DATA_HEADER);
                    while let Some(item) = member.queue.front() {
                        if !items.is_empty()
                            && items.len() + item.len() > MAX_DATAGRAM - DATA_HEADER
                        {
                            break;
                        }
                        items.extend_from_slice(item);
                        member.queue.pop_front();
                    }
                    // Before this one is counted as sent: it is not acknowledged.
                    let floor = member.floor();
                    let seq = member.next_seq;
                    member.next_seq += 1;
                    self.counts.data.fetch_add(1, Ordering::Relaxed);
                    self.transmit(
                        &wire::encode_data(self.id, id, seq, floor, &items),
                        member.addr,
                    );
                    member.unacked.insert(
                        seq,
                        Sent {
                            items,
                            sent_at: now,
                            tries: 1,
                        },
                    );
                }
                room |= was_full && member.queue.len() < MAX_QUEUE;
            }
        }
        if room {
            self.room.notify_waiters();
        }
    }

    fn retransmit(&self, now: Instant) {
        let mut state = self.lock();
        for (&id, member) in state.members.iter_mut().filter(|(_, m)| m.live) {
            let floor = member.floor();
            let (addr, rtt) = (member.addr, member.rtt);
            for (&seq, sent) in member.unacked.iter_mut() {
                let rto = Member::rto_of(rtt, sent.tries);
                if now.duration_since(sent.sent_at) >= rto {
                    self.counts.retransmitted.fetch_add(1, Ordering::Relaxed);
                    self.transmit(
                        &wire::encode_data(self.id, id, seq, floor, &sent.items),
                        addr,
                    );
                    sent.sent_at = now;
                    sent.tries += 1;
                }
            }
        }
    }

    /// Drops the members not heard from for `dead_after`, with what was queued for
    /// them, and forgets what it had from senders gone as long.
    fn expire(&self, now: Instant) {
        let dead_after = self.dead_after;
        let mut state = self.lock();
        state
            .members
            .retain(|_, m| now.duration_since(m.last_heard) < dead_after);
        let State {
            members, received, ..
        } = &mut *state;
        received.retain(|id, r| {
            members.contains_key(id) || now.duration_since(r.last_heard) < dead_after
        });
        drop(state);
        // Publishes waiting for a dead member's queue may go on.
        self.room.notify_waiters();
    }

    /// The members to name in heartbeats: the live ones.
    fn gossip(&self) -> Vec<Peer> {
        self.lock()
            .members
            .iter()
            .filter(|(_, m)| m.live)
            .map(|(&id, m)| Peer {
                id,
                addr: m.addr,
                zone: m.zone.clone(),
            })
            .collect()
    }

    fn heartbeat_to(&self, to: u64, addr: SocketAddr, gossip: &[Peer]) {
        let datagram = wire::encode_heartbeat(self.id, to, &self.zone, self.advertise, gossip);
        self.counts.heartbeats.fetch_add(1, Ordering::Relaxed);
        self.transmit(&datagram, addr);
    }

    /// Heartbeats every member, static peer and the multicast group.
    async fn heartbeats(&self) {
        let mut gossip = self.gossip();
        // Rotated, so that members beyond what one datagram names are named in turn.
        if !gossip.is_empty() {
            let turn = (crate::random::number() % gossip.len() as u64) as usize;
            gossip.rotate_left(turn);
        }
        let targets: Vec<(u64, SocketAddr)> = self
            .lock()
            .members
            .iter()
            .map(|(&id, m)| (id, m.addr))
            .collect();
        let mut contacted: HashSet<SocketAddr> = HashSet::new();
        for (id, addr) in targets {
            self.heartbeat_to(id, addr, &gossip);
            contacted.insert(addr);
        }
        for peer in &self.static_peers {
            // Names are looked up at every beat: a peer's address may change.
            let Ok(addrs) = tokio::net::lookup_host(peer.as_str()).await else {
                continue;
            };
            for addr in addrs {
                if addr != self.advertise && contacted.insert(addr) {
                    self.heartbeat_to(0, addr, &gossip);
                }
            }
        }
        if let Some(group) = self.multicast {
            self.heartbeat_to(0, group, &gossip);
        }
    }
}

impl Member {
    /// The retransmission timeout of a datagram sent `tries` times (RFC 6298's, doubled
    /// per try).
    fn rto_of(rtt: Option<(Duration, Duration)>, tries: u32) -> Duration {
        let base = rtt.map_or(FIRST_RTO, |(srtt, rttvar)| {
            (srtt + rttvar * 4).clamp(MIN_RTO, MAX_RTO)
        });
        (base * 2u32.saturating_pow(tries.saturating_sub(1).min(6))).min(MAX_RTO * 2)
    }
}

impl Inner {
    /// Waits for `request`'s counts to satisfy `enough`, or `deadline`; the counts.
    pub(crate) async fn await_counts(
        &self,
        request: u64,
        changed: &Notify,
        enough: impl Fn(usize, usize) -> bool,
        deadline: Instant,
    ) -> (usize, usize) {
        loop {
            let notified = changed.notified();
            let counts = self.counted(request);
            if enough(counts.0, counts.1) {
                return counts;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.counted(request);
            }
        }
    }
}
