//! An in-process simulated network: a seeded, deterministic [`Transport`] for testing
//! failover on tokio's paused clock.
//!
//! Every node gets a [`SimTransport`] from one shared [`SimNetwork`]. A request is encoded with
//! the real codec, carried over the directed link `from → to` (which may be cut by a partition
//! or a down node, may drop it, delays it and may duplicate it), decoded and handed to the
//! receiver's [`RequestHandler`] in a spawned task; the response comes back over `to → from`
//! under the same rules.
//!
//! Determinism: all randomness comes from one SplitMix64 generator seeded by
//! [`SimNetwork::new`], and every transmission takes a fixed number of draws at the moment it
//! is sent (a request four, a response two), whatever the link's settings, so the same seed and
//! the same sequence of calls give the same drops, delays and duplicates. State is kept in
//! ordered maps only and time is read only through `tokio::time`. Run everything on one
//! current-thread runtime (e.g. `#[tokio::test(start_paused = true)]`) so the order of calls is
//! itself deterministic.
//!
//! Semantics worth knowing:
//! - Messages in flight belong to the network, not to the caller: a request whose caller has
//!   timed out or given up is still delivered and served, as on a real network, so
//!   [`TransportError::Timeout`] means "may or may not have been served".
//! - A message is lost if its link is cut (partition, or either end down) when it is sent, or
//!   at any moment while it is on the wire (even if healed or up again before it lands).
//! - A duplicated request is served twice, each copy after its own delay (so the copy may be
//!   served first); the caller only ever gets the original copy's response.
//! - A restarted node ([`SimNetwork::transport`] again) loses everything of its previous
//!   incarnation: requests addressed to it, the handler tasks it was running and their
//!   responses; the old endpoint's waiting requests fail with [`TransportError::Closed`].
//!   Requests the old incarnation had already put on the wire still arrive and are served;
//!   their responses are lost.
//! - tokio's timer has a resolution of one millisecond and rounds deadlines up, so on the
//!   paused clock a delay is observed as a whole number of milliseconds (the default
//!   100 µs..1 ms link takes 1 ms a hop) and sub-millisecond ranges cannot reorder messages.
//!   Use millisecond-scale ranges to get varied delays and reordering.

use highlander_core::codec;
use highlander_core::wire::{Request, Response};
use highlander_core::{BoxFuture, NodeId, RequestHandler, Transport, TransportError};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

/// The faults of one directed link.
///
/// Probabilities are compared against a uniform draw in `[0, 1)`: `1.0` (or more) always
/// happens, `0.0` (or less, or NaN) never does. If `delay_min > delay_max` the two are swapped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkFaults {
    /// The probability that a message is lost when sent.
    pub drop: f64,
    /// The probability that a request is delivered twice (responses are never duplicated).
    pub duplicate: f64,
    /// The shortest time a message spends on the link.
    pub delay_min: Duration,
    /// The longest time a message spends on the link (inclusive; tokio's timer then rounds
    /// up to the next whole millisecond).
    pub delay_max: Duration,
}

impl Default for LinkFaults {
    /// No loss, no duplication, a delay of 100 µs to 1 ms.
    fn default() -> Self {
        LinkFaults {
            drop: 0.0,
            duplicate: 0.0,
            delay_min: Duration::from_micros(100),
            delay_max: Duration::from_millis(1),
        }
    }
}

/// Counts of what the network did since it was created.
///
/// Once nothing is in flight, `requests_sent + requests_duplicated ==
/// requests_delivered + requests_dropped`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Requests handed to the network (by [`Transport::request`] or [`SimNetwork::send_raw`]),
    /// not counting ones refused at once (`Closed`, `UnknownPeer`, encode errors).
    pub requests_sent: u64,
    /// Request copies (originals and duplicates) handed to a receiver's handler.
    pub requests_delivered: u64,
    /// Request copies lost: cut link, random drop, receiver replaced, shut down or not serving,
    /// or undecodable at the receiver.
    pub requests_dropped: u64,
    /// Extra request copies the network made.
    pub requests_duplicated: u64,
    /// Responses that reached the caller's endpoint (even if the caller had stopped waiting).
    pub responses_delivered: u64,
    /// Responses lost: the responder was replaced, shut down or set down while serving, its
    /// handler panicked, the link was cut or dropped it, or it was undecodable at the caller.
    pub responses_dropped: u64,
}

/// A shared handle to one simulated network; cloning it is cheap and every clone controls the
/// same network.
#[derive(Clone)]
pub struct SimNetwork {
    inner: Arc<Mutex<Inner>>,
}

/// One node's endpoint on a [`SimNetwork`], made by [`SimNetwork::transport`].
pub struct SimTransport {
    net: SimNetwork,
    id: NodeId,
    /// Which incarnation of `id` this is: a later `transport(id)` makes a new one.
    generation: u64,
}

impl SimNetwork {
    /// A network with default links, no partitions and no node down, whose faults are drawn
    /// from `seed`.
    pub fn new(seed: u64) -> SimNetwork {
        SimNetwork {
            inner: Arc::new(Mutex::new(Inner {
                seed,
                rng: SplitMix64(seed),
                next_generation: 1,
                next_key: 1,
                endpoints: BTreeMap::new(),
                down: BTreeSet::new(),
                down_epochs: BTreeMap::new(),
                cuts: BTreeSet::new(),
                cut_epochs: BTreeMap::new(),
                links: BTreeMap::new(),
                default_link: LinkFaults::default(),
                stats: NetStats::default(),
            })),
        }
    }

    /// The seed this network was created with, for reproducing a run.
    pub fn seed(&self) -> u64 {
        self.lock().seed
    }

    /// The endpoint for node `id`. Calling it again for the same id (a restarted node)
    /// replaces the old endpoint: anything the old one had in flight is lost.
    ///
    /// Precisely, replacing an endpoint: fails the old endpoint's waiting requests with
    /// [`TransportError::Closed`] (and its later ones too); aborts the handler tasks it was
    /// running, so their responses are lost; and loses requests addressed to it that are still
    /// on the wire. The new endpoint serves nothing until [`Transport::serve`] is called on it.
    /// Whether the node is down is not changed.
    pub fn transport(&self, id: NodeId) -> SimTransport {
        let (generation, old) = {
            let mut inner = self.lock();
            let generation = inner.next_generation;
            inner.next_generation += 1;
            let old = inner.endpoints.insert(id, Endpoint::new(generation));
            (generation, old.map(Endpoint::close))
        };
        // Outside the lock: dropping the old handler runs user code.
        if let Some(closing) = old {
            tracing::debug!(node = %id, "sim: endpoint replaced");
            closing.finish();
        }
        SimTransport { net: self.clone(), id, generation }
    }

    /// A killed node: every message to or from it is lost, including responses of requests it
    /// was serving.
    ///
    /// A message is lost if either end is down when it is sent or when it arrives, or if
    /// either end went down at any moment while it was on the wire (even if it is up again
    /// by arrival); a response is lost if its responder went down at any moment while serving.
    /// Requests from a down node are not refused: they are lost, so the caller times out.
    pub fn set_down(&self, id: NodeId, down: bool) {
        let mut inner = self.lock();
        if down {
            inner.down.insert(id);
            // A new epoch marks every message in flight to or from `id` as lost.
            *inner.down_epochs.entry(id).or_insert(0) += 1;
        } else {
            inner.down.remove(&id);
        }
        tracing::debug!(node = %id, down, "sim: node down state set");
    }

    /// Cuts every link between a node of `a` and a node of `b`, in both directions.
    ///
    /// Messages sent on a cut link are lost, and so are those on the wire when it is cut,
    /// even if the partition is healed before they would arrive.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        self.partition_oneway(a, b);
        self.partition_oneway(b, a);
    }

    /// Cuts every link from a node of `from` to a node of `to`; the other direction still
    /// carries messages (so requests from `to` reach `from`, but their responses are lost).
    pub fn partition_oneway(&self, from: &[NodeId], to: &[NodeId]) {
        let mut inner = self.lock();
        for &f in from {
            for &t in to {
                inner.cuts.insert((f, t));
                // A new epoch marks every message on this link as lost, even if it is healed
                // before they would arrive.
                *inner.cut_epochs.entry((f, t)).or_insert(0) += 1;
            }
        }
        tracing::debug!(?from, ?to, "sim: one-way partition");
    }

    /// Removes every partition. Link faults and down nodes stay as they are.
    pub fn heal(&self) {
        self.lock().cuts.clear();
        tracing::debug!("sim: partitions healed");
    }

    /// Sets the faults of the one directed link `from → to`, overriding the default.
    pub fn set_link(&self, from: NodeId, to: NodeId, faults: LinkFaults) {
        self.lock().links.insert((from, to), faults);
    }

    /// Sets the faults of every link, including those of nodes not yet created, and removes
    /// the overrides made by [`SimNetwork::set_link`].
    pub fn set_all_links(&self, faults: LinkFaults) {
        let mut inner = self.lock();
        inner.default_link = faults;
        inner.links.clear();
    }

    /// Puts every link back to [`LinkFaults::default`]. Partitions and down nodes stay.
    pub fn clear_link_faults(&self) {
        self.set_all_links(LinkFaults::default());
    }

    /// Whether a message sent now from `from` to `to` is sure to arrive: neither end is down,
    /// the link is not cut, and it drops nothing (it may still be delayed or duplicated).
    pub fn delivers(&self, from: NodeId, to: NodeId) -> bool {
        let inner = self.lock();
        let link = inner.links.get(&(from, to)).unwrap_or(&inner.default_link);
        !inner.down.contains(&from)
            && !inner.down.contains(&to)
            && !inner.cuts.contains(&(from, to))
            && link.drop <= 0.0
    }

    /// What the network has done so far.
    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    /// Sends raw `bytes` to `to` as a request frame from `from`, under the same link rules as
    /// a request (drop, delay, duplication, decode at the receiver); any response is
    /// discarded. For testing that malformed frames are refused harmlessly.
    ///
    /// Does nothing if `to` never got a transport or if called outside a tokio runtime.
    pub fn send_raw(&self, from: NodeId, to: NodeId, bytes: Vec<u8>) {
        if tokio::runtime::Handle::try_current().is_err() {
            tracing::warn!("sim: send_raw called outside a tokio runtime; ignored");
            return;
        }
        let deliveries = {
            let mut inner = self.lock();
            let Some(to_generation) = inner.endpoints.get(&to).map(|e| e.generation) else {
                return;
            };
            inner.send_request(from, to, to_generation, bytes.into(), None)
        };
        for delivery in deliveries {
            tokio::spawn(self.clone().deliver(delivery));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock, but a poisoned lock must not panic either.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Carries one request copy to its receiver, serves it and, for an original, carries the
    /// response back.
    async fn deliver(self, d: Delivery) {
        tokio::time::sleep(d.delay).await;

        let arrived = {
            let mut inner = self.lock();
            inner.arrive_request(&d)
        };
        let Some((handler, request, serving_epoch)) = arrived else {
            return;
        };

        // Outside the lock: `handle` is user code and may call back into the network.
        let task = tokio::spawn(handler.handle(d.from, request));
        let key = {
            let mut inner = self.lock();
            let key = inner.next_key();
            match inner.current_mut(d.to, d.to_generation) {
                Some(endpoint) => {
                    endpoint.serving.insert(key, task.abort_handle());
                }
                // Replaced or shut down between arrival and spawn (possible off a
                // current-thread runtime): the node no longer runs this handler.
                None => task.abort(),
            }
            key
        };

        let outcome = task.await;

        let sent = {
            let mut inner = self.lock();
            if let Some(endpoint) = inner.current_mut(d.to, d.to_generation) {
                endpoint.serving.remove(&key);
            }
            let response = match outcome {
                Ok(response) => response,
                Err(error) => {
                    if error.is_panic() {
                        tracing::warn!(from = %d.from, to = %d.to, "sim: request handler panicked");
                    }
                    // Otherwise aborted: the endpoint was replaced or shut down.
                    if d.reply.is_some() {
                        inner.stats.responses_dropped += 1;
                    }
                    return;
                }
            };
            // A duplicate's response is discarded at the receiver: the caller waits for one.
            let Some(reply) = d.reply else {
                return;
            };
            inner.send_response(&d, serving_epoch, reply, &response)
        };
        let Some((hop, delay, bytes, reply)) = sent else {
            return;
        };

        tokio::time::sleep(delay).await;
        self.arrive_response(hop, reply, &bytes);
    }

    /// A response reaching the caller's endpoint.
    fn arrive_response(&self, hop: Hop, reply: ReplyTo, bytes: &[u8]) {
        let waiter = {
            let mut inner = self.lock();
            if !inner.hop_open(&hop) {
                tracing::trace!(from = %hop.from, to = %hop.to, "sim: response lost in flight");
                inner.stats.responses_dropped += 1;
                return;
            }
            let response = match codec::decode::<Response>(bytes) {
                Ok(response) => response,
                Err(error) => {
                    tracing::warn!(from = %hop.from, to = %hop.to, %error, "sim: undecodable response dropped");
                    inner.stats.responses_dropped += 1;
                    return;
                }
            };
            // The caller's endpoint was replaced or shut down: its waiters already got `Closed`.
            let Some(endpoint) = inner.current_mut(hop.to, reply.generation) else {
                inner.stats.responses_dropped += 1;
                return;
            };
            let waiter = endpoint.pending.remove(&reply.call_id);
            inner.stats.responses_delivered += 1;
            waiter.map(|tx| (tx, response))
        };
        if let Some((tx, response)) = waiter {
            // The caller may have gone between our check and now; nothing to do then.
            let _ = tx.send(Ok(response));
        }
    }
}

impl fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("SimNetwork")
            .field("seed", &inner.seed)
            .field("nodes", &inner.endpoints.keys().collect::<Vec<_>>())
            .field("down", &inner.down)
            .field("stats", &inner.stats)
            .finish_non_exhaustive()
    }
}

impl SimTransport {
    /// The network this endpoint belongs to.
    pub fn network(&self) -> &SimNetwork {
        &self.net
    }

    /// Registers a request with the network and puts its copies on the wire: the call id and
    /// the receiver its response (or `Closed`) will arrive on.
    fn begin(&self, to: NodeId, request: &Request) -> Result<(u64, Waiter), TransportError> {
        let (call_id, rx, deliveries) = {
            let mut inner = self.net.lock();
            if inner.current_mut(self.id, self.generation).is_none() {
                return Err(TransportError::Closed);
            }
            let Some(to_generation) = inner.endpoints.get(&to).map(|e| e.generation) else {
                return Err(TransportError::UnknownPeer(to));
            };
            let bytes = codec::encode(request)?;
            let call_id = inner.next_key();
            let (tx, rx) = oneshot::channel();
            if let Some(endpoint) = inner.current_mut(self.id, self.generation) {
                endpoint.pending.insert(call_id, tx);
            }
            let reply = ReplyTo { generation: self.generation, call_id };
            let deliveries =
                inner.send_request(self.id, to, to_generation, bytes.into(), Some(reply));
            (call_id, rx, deliveries)
        };
        for delivery in deliveries {
            tokio::spawn(self.net.clone().deliver(delivery));
        }
        Ok((call_id, rx))
    }
}

impl fmt::Debug for SimTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimTransport")
            .field("id", &self.id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Transport for SimTransport {
    fn local_id(&self) -> NodeId {
        self.id
    }

    /// Installs `handler` for requests to this endpoint. Fails with `Closed` if the endpoint
    /// was shut down or replaced, and with `Unreachable` (naming this node) if it is already
    /// serving. Requests that arrive before this is called are lost.
    fn serve(&self, handler: Arc<dyn RequestHandler>) -> Result<(), TransportError> {
        let mut inner = self.net.lock();
        let Some(endpoint) = inner.current_mut(self.id, self.generation) else {
            return Err(TransportError::Closed);
        };
        if endpoint.handler.is_some() {
            return Err(TransportError::Unreachable {
                peer: self.id,
                reason: "this endpoint is already serving".into(),
            });
        }
        endpoint.handler = Some(handler);
        Ok(())
    }

    /// Sends `request` to `to`; see the module docs for the rules. Gives
    /// [`TransportError::Timeout`] if no response arrives within `timeout` (the request may
    /// still be delivered and served later), and [`TransportError::Closed`] at once if this
    /// endpoint is, or while waiting becomes, shut down or replaced.
    fn request(
        &self,
        to: NodeId,
        request: Request,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Response, TransportError>> {
        Box::pin(async move {
            let exchange = async {
                let (call_id, rx) = self.begin(to, &request)?;
                // Removes the waiter if this future is dropped (timeout or cancellation).
                let _guard = PendingGuard {
                    net: &self.net,
                    id: self.id,
                    generation: self.generation,
                    call_id,
                };
                match rx.await {
                    Ok(result) => result,
                    // The waiter was dropped unanswered; treat as lost and wait for the timeout.
                    Err(_) => std::future::pending().await,
                }
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Timeout),
            }
        })
    }

    /// Detaches the handler (aborting the handler tasks in progress, whose responses are lost),
    /// fails this endpoint's waiting and later requests with [`TransportError::Closed`], and
    /// makes requests to this node be lost. Idempotent; a no-op on a replaced endpoint.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        let closing = {
            let mut inner = self.net.lock();
            inner.current_mut(self.id, self.generation).map(Endpoint::close_in_place)
        };
        if let Some(closing) = closing {
            tracing::debug!(node = %self.id, "sim: endpoint shut down");
            closing.finish();
        }
        Box::pin(async {})
    }
}

/// Removes a caller's waiter when its request future ends, however it ends.
struct PendingGuard<'a> {
    net: &'a SimNetwork,
    id: NodeId,
    generation: u64,
    call_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let waiter = {
            let mut inner = self.net.lock();
            inner
                .current_mut(self.id, self.generation)
                .and_then(|e| e.pending.remove(&self.call_id))
        };
        drop(waiter);
    }
}

/// Where a caller's response, or `Closed`, arrives.
type Waiter = oneshot::Receiver<Result<Response, TransportError>>;

/// Everything behind the [`SimNetwork`] handle.
struct Inner {
    seed: u64,
    rng: SplitMix64,
    next_generation: u64,
    /// Source of call ids and serving-task keys.
    next_key: u64,
    /// The current endpoint of every node that ever got a transport.
    endpoints: BTreeMap<NodeId, Endpoint>,
    down: BTreeSet<NodeId>,
    /// Bumped each time a node goes down, so messages that saw the change are lost.
    down_epochs: BTreeMap<NodeId, u64>,
    /// Cut directed links `(from, to)`.
    cuts: BTreeSet<(NodeId, NodeId)>,
    /// Bumped each time a directed link is cut, so messages on it at that moment are lost.
    cut_epochs: BTreeMap<(NodeId, NodeId), u64>,
    links: BTreeMap<(NodeId, NodeId), LinkFaults>,
    default_link: LinkFaults,
    stats: NetStats,
}

/// One incarnation of a node on the network.
struct Endpoint {
    generation: u64,
    closed: bool,
    handler: Option<Arc<dyn RequestHandler>>,
    /// Callers waiting for a response, by call id.
    pending: BTreeMap<u64, Answer>,
    /// Handler tasks in progress, so closing the endpoint can stop them.
    serving: BTreeMap<u64, AbortHandle>,
}

/// The sending half of a [`Waiter`].
type Answer = oneshot::Sender<Result<Response, TransportError>>;

/// What closing an endpoint leaves to be done outside the lock.
struct Closing {
    handler: Option<Arc<dyn RequestHandler>>,
    pending: BTreeMap<u64, Answer>,
    serving: BTreeMap<u64, AbortHandle>,
}

impl Endpoint {
    fn new(generation: u64) -> Endpoint {
        Endpoint {
            generation,
            closed: false,
            handler: None,
            pending: BTreeMap::new(),
            serving: BTreeMap::new(),
        }
    }

    fn close(mut self) -> Closing {
        self.close_in_place()
    }

    fn close_in_place(&mut self) -> Closing {
        self.closed = true;
        Closing {
            handler: self.handler.take(),
            pending: std::mem::take(&mut self.pending),
            serving: std::mem::take(&mut self.serving),
        }
    }
}

impl Closing {
    fn finish(self) {
        for (_, task) in self.serving {
            task.abort();
        }
        for (_, tx) in self.pending {
            let _ = tx.send(Err(TransportError::Closed));
        }
        drop(self.handler);
    }
}

/// Where an original request's response goes.
#[derive(Clone, Copy)]
struct ReplyTo {
    generation: u64,
    call_id: u64,
}

/// A directed hop as it was when a message was sent, to tell whether it survived the flight.
#[derive(Clone, Copy)]
struct Hop {
    from: NodeId,
    to: NodeId,
    from_epoch: u64,
    to_epoch: u64,
    link_epoch: u64,
}

/// One request copy on the wire.
struct Delivery {
    from: NodeId,
    to: NodeId,
    /// The incarnation of `to` it was addressed to; a restarted node does not get it.
    to_generation: u64,
    hop: Hop,
    delay: Duration,
    bytes: Arc<[u8]>,
    /// `None` for duplicates and raw frames, whose responses are discarded.
    reply: Option<ReplyTo>,
}

impl Inner {
    fn next_key(&mut self) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        key
    }

    /// The endpoint `id` if it is still incarnation `generation` and not shut down.
    fn current_mut(&mut self, id: NodeId, generation: u64) -> Option<&mut Endpoint> {
        self.endpoints.get_mut(&id).filter(|e| e.generation == generation && !e.closed)
    }

    fn epoch(&self, id: NodeId) -> u64 {
        self.down_epochs.get(&id).copied().unwrap_or(0)
    }

    fn cut_epoch(&self, from: NodeId, to: NodeId) -> u64 {
        self.cut_epochs.get(&(from, to)).copied().unwrap_or(0)
    }

    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.down.contains(&from) || self.down.contains(&to) || self.cuts.contains(&(from, to))
    }

    fn link(&self, from: NodeId, to: NodeId) -> LinkFaults {
        self.links.get(&(from, to)).copied().unwrap_or(self.default_link)
    }

    fn hop(&self, from: NodeId, to: NodeId) -> Hop {
        Hop {
            from,
            to,
            from_epoch: self.epoch(from),
            to_epoch: self.epoch(to),
            link_epoch: self.cut_epoch(from, to),
        }
    }

    /// Whether a message sent over `hop` may arrive now.
    fn hop_open(&self, hop: &Hop) -> bool {
        !self.is_cut(hop.from, hop.to)
            && self.epoch(hop.from) == hop.from_epoch
            && self.epoch(hop.to) == hop.to_epoch
            && self.cut_epoch(hop.from, hop.to) == hop.link_epoch
    }

    /// A uniform delay in the link's range.
    fn draw_delay(&mut self, faults: &LinkFaults) -> Duration {
        let (lo, hi) = if faults.delay_min <= faults.delay_max {
            (faults.delay_min, faults.delay_max)
        } else {
            (faults.delay_max, faults.delay_min)
        };
        let span = u64::try_from((hi - lo).as_nanos()).unwrap_or(u64::MAX);
        let offset = self.rng.below(u128::from(span) + 1);
        lo.saturating_add(Duration::from_nanos(offset))
    }

    /// Puts a request on the link `from → to`: the copies to deliver (none if lost, two if
    /// duplicated). Always takes four draws: drop, delay, duplicate, duplicate's delay.
    fn send_request(
        &mut self,
        from: NodeId,
        to: NodeId,
        to_generation: u64,
        bytes: Arc<[u8]>,
        reply: Option<ReplyTo>,
    ) -> Vec<Delivery> {
        let faults = self.link(from, to);
        let drop_roll = self.rng.unit();
        let delay = self.draw_delay(&faults);
        let duplicate_roll = self.rng.unit();
        let duplicate_delay = self.draw_delay(&faults);
        self.stats.requests_sent += 1;

        if self.is_cut(from, to) {
            tracing::trace!(%from, %to, "sim: request lost: link cut");
            self.stats.requests_dropped += 1;
            return Vec::new();
        }
        if drop_roll < faults.drop {
            tracing::trace!(%from, %to, "sim: request dropped");
            self.stats.requests_dropped += 1;
            return Vec::new();
        }
        let hop = self.hop(from, to);
        let mut copies =
            vec![Delivery { from, to, to_generation, hop, delay, bytes: bytes.clone(), reply }];
        if duplicate_roll < faults.duplicate {
            tracing::trace!(%from, %to, "sim: request duplicated");
            self.stats.requests_duplicated += 1;
            copies.push(Delivery {
                from,
                to,
                to_generation,
                hop,
                delay: duplicate_delay,
                bytes,
                reply: None,
            });
        }
        copies
    }

    /// A request copy reaching its receiver: the handler to run, the decoded request and the
    /// receiver's down epoch, or `None` (counted as dropped) if it is lost.
    fn arrive_request(&mut self, d: &Delivery) -> Option<(Arc<dyn RequestHandler>, Request, u64)> {
        if !self.hop_open(&d.hop) {
            tracing::trace!(from = %d.from, to = %d.to, "sim: request lost in flight");
            self.stats.requests_dropped += 1;
            return None;
        }
        let Some(handler) = self.current_mut(d.to, d.to_generation).and_then(|e| e.handler.clone())
        else {
            tracing::trace!(from = %d.from, to = %d.to, "sim: request lost: receiver gone or not serving");
            self.stats.requests_dropped += 1;
            return None;
        };
        match codec::decode::<Request>(&d.bytes) {
            Ok(request) => {
                self.stats.requests_delivered += 1;
                Some((handler, request, self.epoch(d.to)))
            }
            Err(error) => {
                tracing::warn!(from = %d.from, to = %d.to, %error, "sim: undecodable request dropped");
                self.stats.requests_dropped += 1;
                None
            }
        }
    }

    /// Puts a served request's response on the link `to → from`, or loses it (counted).
    /// Always takes two draws (drop, delay) once the responder is found alive.
    fn send_response(
        &mut self,
        d: &Delivery,
        serving_epoch: u64,
        reply: ReplyTo,
        response: &Response,
    ) -> Option<(Hop, Duration, Vec<u8>, ReplyTo)> {
        let (responder, caller) = (d.to, d.from);
        // A responder replaced, shut down or killed while serving never sends its answer.
        if self.current_mut(responder, d.to_generation).is_none()
            || self.down.contains(&responder)
            || self.epoch(responder) != serving_epoch
        {
            tracing::trace!(from = %responder, to = %caller, "sim: response lost: responder gone");
            self.stats.responses_dropped += 1;
            return None;
        }
        let bytes = match codec::encode(response) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(from = %responder, to = %caller, %error, "sim: unencodable response dropped");
                self.stats.responses_dropped += 1;
                return None;
            }
        };
        let faults = self.link(responder, caller);
        let drop_roll = self.rng.unit();
        let delay = self.draw_delay(&faults);
        if self.is_cut(responder, caller) || drop_roll < faults.drop {
            tracing::trace!(from = %responder, to = %caller, "sim: response lost on send");
            self.stats.responses_dropped += 1;
            return None;
        }
        Some((self.hop(responder, caller), delay, bytes, reply))
    }
}

/// SplitMix64: tiny, fast and good enough for fault injection; fully determined by its seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, n)` for `1 <= n <= 2^64` (multiply-high, no modulo loop).
    fn below(&mut self, n: u128) -> u64 {
        ((u128::from(self.next_u64()) * n) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use highlander_core::Payload;
    use highlander_core::wire::{RaftMessage, StatusReport};
    use tokio::time::{Instant, sleep};

    /// An echo handler that records who called it and when, optionally taking `delay` to
    /// answer, or panicking.
    struct Echo {
        id: NodeId,
        delay: Duration,
        panic: bool,
        calls: Arc<Mutex<Vec<(NodeId, Instant)>>>,
    }

    type Calls = Arc<Mutex<Vec<(NodeId, Instant)>>>;

    impl RequestHandler for Echo {
        fn handle(&self, from: NodeId, request: Request) -> BoxFuture<'static, Response> {
            self.calls.lock().unwrap().push((from, Instant::now()));
            let (id, delay, panic) = (self.id, self.delay, self.panic);
            Box::pin(async move {
                if !delay.is_zero() {
                    sleep(delay).await;
                }
                assert!(!panic, "test handler told to panic");
                match request {
                    Request::Raft { message: RaftMessage::AppendEntries(p), .. } => {
                        Response::Raft(p)
                    }
                    Request::Status(_) => Response::Status(Box::new(StatusReport {
                        node: Some(id),
                        ..StatusReport::default()
                    })),
                    _ => Response::Refused("echo".into()),
                }
            })
        }
    }

    fn serve_with(t: &SimTransport, delay: Duration, panic: bool) -> Calls {
        let calls = Calls::default();
        t.serve(Arc::new(Echo { id: t.local_id(), delay, panic, calls: calls.clone() })).unwrap();
        calls
    }

    fn serve(t: &SimTransport) -> Calls {
        serve_with(t, Duration::ZERO, false)
    }

    fn count(calls: &Calls) -> usize {
        calls.lock().unwrap().len()
    }

    fn ping(n: u32) -> Request {
        Request::Raft {
            to: 1,
            message: RaftMessage::AppendEntries(Payload::from(n.to_le_bytes().to_vec())),
        }
    }

    fn pong(n: u32) -> Response {
        Response::Raft(Payload::from(n.to_le_bytes().to_vec()))
    }

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const C: NodeId = NodeId(3);
    const T: Duration = Duration::from_millis(100);

    /// Waits long enough for everything in flight to land.
    async fn settle() {
        sleep(Duration::from_secs(5)).await;
    }

    fn assert_balanced(s: NetStats) {
        assert_eq!(
            s.requests_sent + s.requests_duplicated,
            s.requests_delivered + s.requests_dropped,
            "{s:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn request_round_trips() {
        let net = SimNetwork::new(1);
        let a = net.transport(A);
        let b = net.transport(B);
        serve(&a);
        let b_calls = serve(&b);

        let start = Instant::now();
        assert_eq!(a.request(B, ping(7), T).await, Ok(pong(7)));
        let rtt = start.elapsed();
        // Two hops of the default 100 µs..1 ms.
        assert!(rtt >= Duration::from_micros(200) && rtt <= Duration::from_millis(2), "{rtt:?}");
        assert_eq!(b_calls.lock().unwrap()[0].0, A);

        let Ok(Response::Status(report)) =
            b.request(A, Request::Status(highlander_core::wire::KeyQuery::default()), T).await
        else {
            panic!("no status");
        };
        assert_eq!(report.node, Some(A));
        // A node may talk to itself.
        assert_eq!(a.request(A, ping(1), T).await, Ok(pong(1)));

        let s = net.stats();
        assert_eq!((s.requests_sent, s.requests_delivered, s.responses_delivered), (3, 3, 3));
        assert_eq!((s.requests_dropped, s.responses_dropped, s.requests_duplicated), (0, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_peer_and_not_serving() {
        let net = SimNetwork::new(1);
        let a = net.transport(A);
        let _b = net.transport(B);
        assert_eq!(
            a.request(NodeId(9), ping(0), T).await,
            Err(TransportError::UnknownPeer(NodeId(9)))
        );
        assert_eq!(net.stats().requests_sent, 0);
        // Known but not serving yet: lost, the caller times out.
        let start = Instant::now();
        assert_eq!(a.request(B, ping(0), T).await, Err(TransportError::Timeout));
        assert_eq!(start.elapsed(), T);
        assert_eq!(net.stats().requests_dropped, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn two_way_partition_and_heal() {
        let net = SimNetwork::new(2);
        let (a, b, c) = (net.transport(A), net.transport(B), net.transport(C));
        let a_calls = serve(&a);
        let b_calls = serve(&b);
        serve(&c);

        net.partition(&[A], &[B]);
        assert_eq!(a.request(B, ping(1), T).await, Err(TransportError::Timeout));
        assert_eq!(b.request(A, ping(2), T).await, Err(TransportError::Timeout));
        assert_eq!((count(&a_calls), count(&b_calls)), (0, 0));
        // Links outside the partition still work.
        assert_eq!(a.request(C, ping(3), T).await, Ok(pong(3)));
        assert_eq!(c.request(B, ping(4), T).await, Ok(pong(4)));

        net.heal();
        assert_eq!(a.request(B, ping(5), T).await, Ok(pong(5)));
        assert_eq!(b.request(A, ping(6), T).await, Ok(pong(6)));
        assert_eq!(net.stats().requests_dropped, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn partition_that_begins_in_flight_loses_the_message() {
        let net = SimNetwork::new(2);
        let (a, b) = (net.transport(A), net.transport(B));
        let b_calls = serve(&b);
        net.set_all_links(LinkFaults {
            delay_min: Duration::from_millis(10),
            delay_max: Duration::from_millis(10),
            ..LinkFaults::default()
        });
        let (result, ()) = tokio::join!(a.request(B, ping(1), T), async {
            sleep(Duration::from_millis(5)).await;
            net.partition(&[A], &[B]);
            sleep(Duration::from_millis(1)).await;
            net.heal();
        });
        // Healed before it would have arrived, but cut while it was crossing: lost.
        assert_eq!(result, Err(TransportError::Timeout));
        assert_eq!(count(&b_calls), 0);

        // Still cut at arrival: lost.
        let (result, ()) = tokio::join!(a.request(B, ping(2), T), async {
            sleep(Duration::from_millis(5)).await;
            net.partition(&[A], &[B]);
        });
        assert_eq!(result, Err(TransportError::Timeout));
        assert_eq!(count(&b_calls), 0);

        // A cut of the other direction only, while the request crosses: delivered, but the
        // response then finds B → A cut.
        net.heal();
        let (result, ()) = tokio::join!(a.request(B, ping(3), T), async {
            sleep(Duration::from_millis(5)).await;
            net.partition_oneway(&[B], &[A]);
        });
        assert_eq!(result, Err(TransportError::Timeout));
        assert_eq!(count(&b_calls), 1);
        let s = net.stats();
        assert_eq!((s.requests_dropped, s.responses_dropped), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn one_way_partition_loses_responses() {
        let net = SimNetwork::new(3);
        let (a, b) = (net.transport(A), net.transport(B));
        let a_calls = serve(&a);
        let b_calls = serve(&b);

        net.partition_oneway(&[A], &[B]);
        // A → B is cut: A's request never reaches B.
        assert_eq!(a.request(B, ping(1), T).await, Err(TransportError::Timeout));
        assert_eq!(count(&b_calls), 0);
        // B → A is open: B's request reaches A and A serves it, but A's response travels
        // A → B and is lost, so B times out.
        assert_eq!(b.request(A, ping(2), T).await, Err(TransportError::Timeout));
        assert_eq!(count(&a_calls), 1);
        assert_eq!(a_calls.lock().unwrap()[0].0, B);
        let s = net.stats();
        assert_eq!((s.requests_dropped, s.requests_delivered), (1, 1));
        assert_eq!((s.responses_dropped, s.responses_delivered), (1, 0));

        net.heal();
        assert_eq!(b.request(A, ping(3), T).await, Ok(pong(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn drop_one_loses_everything_drop_zero_nothing() {
        let net = SimNetwork::new(4);
        let (a, b) = (net.transport(A), net.transport(B));
        serve(&a);
        let b_calls = serve(&b);

        net.set_all_links(LinkFaults { drop: 1.0, ..LinkFaults::default() });
        for i in 0..50 {
            assert_eq!(a.request(B, ping(i), T).await, Err(TransportError::Timeout));
        }
        assert_eq!(count(&b_calls), 0);
        assert_eq!(net.stats().requests_dropped, 50);

        net.set_all_links(LinkFaults {
            drop: 0.0,
            delay_min: Duration::ZERO,
            delay_max: Duration::from_millis(20),
            ..LinkFaults::default()
        });
        for i in 0..200 {
            assert_eq!(a.request(B, ping(i), T).await, Ok(pong(i)));
        }
        assert_eq!(count(&b_calls), 200);

        // Only the response direction lossy: every request is served, none answered.
        net.clear_link_faults();
        net.set_link(B, A, LinkFaults { drop: 1.0, ..LinkFaults::default() });
        assert_eq!(a.request(B, ping(0), T).await, Err(TransportError::Timeout));
        assert_eq!(count(&b_calls), 201);
        assert_eq!(b.request(A, ping(0), T).await, Err(TransportError::Timeout));
        assert_eq!(net.stats().responses_dropped, 1);
        assert_balanced(net.stats());
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_run_the_handler_twice_and_answer_once() {
        let net = SimNetwork::new(5);
        let (a, b) = (net.transport(A), net.transport(B));
        let b_calls = serve(&b);
        net.set_all_links(LinkFaults { duplicate: 1.0, ..LinkFaults::default() });
        for i in 0..20 {
            assert_eq!(a.request(B, ping(i), T).await, Ok(pong(i)));
        }
        settle().await;
        assert_eq!(count(&b_calls), 40);
        let s = net.stats();
        assert_eq!((s.requests_sent, s.requests_duplicated), (20, 20));
        assert_eq!((s.requests_delivered, s.responses_delivered), (40, 20));
        assert_balanced(s);
    }

    #[tokio::test(start_paused = true)]
    async fn delays_fall_in_the_range() {
        let net = SimNetwork::new(6);
        let (a, b) = (net.transport(A), net.transport(B));
        let b_calls = serve(&b);
        let (lo, hi) = (Duration::from_millis(5), Duration::from_millis(10));
        // Given backwards on purpose: the range is normalised.
        net.set_all_links(LinkFaults { delay_min: hi, delay_max: lo, ..LinkFaults::default() });
        let mut one_way = Vec::new();
        for i in 0..200 {
            let start = Instant::now();
            assert_eq!(a.request(B, ping(i), Duration::from_secs(1)).await, Ok(pong(i)));
            let rtt = start.elapsed();
            let arrived = b_calls.lock().unwrap()[i as usize].1;
            let there = arrived - start;
            assert!(there >= lo && there <= hi, "{there:?}");
            assert!(rtt >= 2 * lo && rtt <= 2 * hi, "{rtt:?}");
            one_way.push(there);
        }
        // Spread over the range, not stuck at one end. tokio's timer fires on whole
        // milliseconds (deadlines round up), so on the paused clock we see 6..=10 ms.
        one_way.sort();
        one_way.dedup();
        assert!(one_way.len() >= 4, "{one_way:?}");
        assert!(one_way[0] <= Duration::from_millis(6), "{one_way:?}");
        assert_eq!(one_way.last(), Some(&hi));
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_set_down_loses_its_in_flight_response() {
        let net = SimNetwork::new(7);
        let (a, b) = (net.transport(A), net.transport(B));
        serve(&a);
        let b_calls = serve_with(&b, Duration::from_millis(50), false);

        let (result, ()) = tokio::join!(a.request(B, ping(1), T), async {
            sleep(Duration::from_millis(10)).await;
            net.set_down(B, true);
        });
        assert_eq!(result, Err(TransportError::Timeout));
        assert_eq!(count(&b_calls), 1);
        assert_eq!(net.stats().responses_dropped, 1);

        // Down: nothing in or out.
        assert_eq!(a.request(B, ping(2), T).await, Err(TransportError::Timeout));
        assert_eq!(b.request(A, ping(3), T).await, Err(TransportError::Timeout));
        assert_eq!(count(&b_calls), 1);

        // Down and up again while serving still loses the response.
        net.set_down(B, false);
        let (result, ()) = tokio::join!(a.request(B, ping(4), T), async {
            sleep(Duration::from_millis(10)).await;
            net.set_down(B, true);
            sleep(Duration::from_millis(1)).await;
            net.set_down(B, false);
        });
        assert_eq!(result, Err(TransportError::Timeout));
        assert_eq!(count(&b_calls), 2);

        // Up: served again.
        assert_eq!(a.request(B, ping(5), T).await, Ok(pong(5)));
        settle().await;
        assert_balanced(net.stats());
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_endpoint_loses_its_responses_and_is_closed() {
        let net = SimNetwork::new(8);
        let a = net.transport(A);
        let old_b = net.transport(B);
        let a_calls = serve_with(&a, Duration::from_millis(50), false);
        let old_calls = serve_with(&old_b, Duration::from_millis(50), false);

        // A request being served by the old B, and one the old B is waiting on.
        let started = Instant::now();
        let (to_old, from_old, new_b) =
            tokio::join!(a.request(B, ping(1), T), old_b.request(A, ping(2), T), async {
                sleep(Duration::from_millis(10)).await;
                net.transport(B)
            });
        // The old B's handler was aborted: its response never comes.
        assert_eq!(to_old, Err(TransportError::Timeout));
        assert_eq!(count(&old_calls), 1);
        // The old B's waiting request failed at once with `Closed`, though A served it.
        assert_eq!(from_old, Err(TransportError::Closed));
        assert_eq!(count(&a_calls), 1);
        assert!(started.elapsed() >= T);

        // The old endpoint is closed for good.
        let start = Instant::now();
        assert_eq!(old_b.request(A, ping(3), T).await, Err(TransportError::Closed));
        assert_eq!(start.elapsed(), Duration::ZERO);
        let handler =
            Arc::new(Echo { id: B, delay: Duration::ZERO, panic: false, calls: Calls::default() });
        assert_eq!(old_b.serve(handler), Err(TransportError::Closed));

        // The new B serves once it is told to.
        let new_calls = serve(&new_b);
        assert_eq!(a.request(B, ping(4), Duration::from_secs(1)).await, Ok(pong(4)));
        assert_eq!(new_b.request(A, ping(5), Duration::from_secs(1)).await, Ok(pong(5)));

        // A request addressed to the old incarnation, still on the wire at the restart, is
        // lost even though the new one is serving by the time it lands.
        net.set_all_links(LinkFaults {
            delay_min: Duration::from_millis(20),
            delay_max: Duration::from_millis(20),
            ..LinkFaults::default()
        });
        let (result, newest) = tokio::join!(a.request(B, ping(6), T), async {
            sleep(Duration::from_millis(5)).await;
            let b = net.transport(B);
            let calls = serve(&b);
            (b, calls)
        });
        assert_eq!(result, Err(TransportError::Timeout));
        assert_eq!(count(&newest.1), 0);
        assert_eq!(count(&new_calls), 1);
        settle().await;
        assert_balanced(net.stats());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_the_endpoint() {
        let net = SimNetwork::new(9);
        let (a, b) = (net.transport(A), net.transport(B));
        serve(&a);
        serve_with(&b, Duration::from_millis(50), false);
        assert!(matches!(
            b.serve(Arc::new(Echo {
                id: B,
                delay: Duration::ZERO,
                panic: false,
                calls: Calls::default(),
            })),
            Err(TransportError::Unreachable { .. })
        ));

        let (waiting, ()) = tokio::join!(a.request(B, ping(1), T), async {
            sleep(Duration::from_millis(10)).await;
            a.shutdown().await;
        });
        assert_eq!(waiting, Err(TransportError::Closed));
        assert_eq!(a.request(B, ping(2), T).await, Err(TransportError::Closed));
        // Requests to a shut-down node are lost, not refused.
        assert_eq!(b.request(A, ping(3), T).await, Err(TransportError::Timeout));
        a.shutdown().await;
        // A fresh endpoint for the same node works.
        let a2 = net.transport(A);
        serve(&a2);
        assert_eq!(b.request(A, ping(4), T).await, Ok(pong(4)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_handler_only_loses_its_response() {
        let net = SimNetwork::new(10);
        let (a, b) = (net.transport(A), net.transport(B));
        serve_with(&b, Duration::ZERO, true);
        assert_eq!(a.request(B, ping(1), T).await, Err(TransportError::Timeout));
        assert_eq!(net.stats().responses_dropped, 1);
    }

    /// Per-request outcome: whether it was answered, and when it finished.
    type Outcomes = Vec<(bool, Duration)>;

    async fn chaos(seed: u64) -> (NetStats, Outcomes) {
        let net = SimNetwork::new(seed);
        let nodes: Vec<Arc<SimTransport>> =
            (0..3).map(|i| Arc::new(net.transport(NodeId(i)))).collect();
        for t in &nodes {
            serve_with(t, Duration::from_micros(300), false);
        }
        net.set_all_links(LinkFaults {
            drop: 0.3,
            duplicate: 0.1,
            delay_min: Duration::from_micros(100),
            delay_max: Duration::from_millis(20),
        });
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..300u32 {
            let from = nodes[i as usize % 3].clone();
            let to = NodeId(u64::from((i + 1 + i / 3) % 3));
            tasks.push(tokio::spawn(async move {
                sleep(Duration::from_micros(u64::from(i) * 700)).await;
                let result = from.request(to, ping(i), Duration::from_millis(30)).await;
                if let Ok(response) = &result {
                    assert_eq!(*response, pong(i));
                }
                (result.is_ok(), start.elapsed())
            }));
        }
        let faults = {
            let net = net.clone();
            tokio::spawn(async move {
                sleep(Duration::from_millis(60)).await;
                net.partition(&[NodeId(0)], &[NodeId(1), NodeId(2)]);
                sleep(Duration::from_millis(30)).await;
                net.heal();
                net.partition_oneway(&[NodeId(1)], &[NodeId(2)]);
                sleep(Duration::from_millis(30)).await;
                net.heal();
                net.set_down(NodeId(2), true);
                sleep(Duration::from_millis(20)).await;
                net.set_down(NodeId(2), false);
            })
        };
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        faults.await.unwrap();
        settle().await;
        (net.stats(), outcomes)
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_seed_gives_the_same_run() {
        let (stats, outcomes) = chaos(42).await;
        let answered = outcomes.iter().filter(|o| o.0).count();
        // Sanity: the run really mixes both outcomes.
        assert!(answered > 50 && answered < 250, "{answered}");
        assert!(stats.requests_duplicated > 0 && stats.responses_dropped > 0, "{stats:?}");
        assert_balanced(stats);

        assert_eq!(chaos(42).await, (stats, outcomes.clone()));
        let (other_stats, other_outcomes) = chaos(43).await;
        assert_ne!(other_outcomes, outcomes);
        assert_ne!(other_stats, stats);
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_bytes_never_panic() {
        let net = SimNetwork::new(11);
        let (a, b) = (net.transport(A), net.transport(B));
        serve(&a);
        let b_calls = serve(&b);

        let mut frames: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xff; 7],
            vec![0, 0, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10],
            codec::encode(&ping(1)).unwrap()[..3].to_vec(),
            {
                let mut v = codec::encode(&ping(1)).unwrap();
                v.push(0);
                v
            },
        ];
        let mut rng = SplitMix64(99);
        for _ in 0..300 {
            let len = rng.below(64) as usize;
            frames.push((0..len).map(|_| rng.next_u64() as u8).collect());
        }
        let valid = frames.iter().filter(|f| codec::decode::<Request>(f).is_ok()).count();
        for frame in &frames {
            net.send_raw(A, B, frame.clone());
        }
        // A well-formed raw frame is served like a request.
        net.send_raw(A, B, codec::encode(&ping(2)).unwrap());
        settle().await;
        assert_eq!(count(&b_calls), valid + 1);
        let s = net.stats();
        assert_eq!(s.requests_sent as usize, frames.len() + 1);
        assert_eq!(s.requests_dropped as usize, frames.len() - valid);
        assert_eq!(s.responses_delivered, 0);

        // Garbage on the response path is dropped too.
        let hop = net.lock().hop(B, A);
        let reply = ReplyTo { generation: a.generation, call_id: 12345 };
        net.arrive_response(hop, reply, &[0xff; 9]);
        assert_eq!(net.stats().responses_dropped, 1);

        // And the network still works.
        assert_eq!(a.request(B, ping(3), T).await, Ok(pong(3)));
    }

    #[test]
    fn draws_stay_in_range() {
        let mut rng = SplitMix64(0);
        for _ in 0..10_000 {
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
            assert!(rng.below(3) < 3);
        }
        assert_eq!(rng.below(1), 0);
        let net = SimNetwork::new(0);
        let extreme = LinkFaults {
            delay_min: Duration::ZERO,
            delay_max: Duration::MAX,
            ..LinkFaults::default()
        };
        for _ in 0..100 {
            let _ = net.lock().draw_delay(&extreme);
        }
        let point = LinkFaults {
            delay_min: Duration::from_millis(3),
            delay_max: Duration::from_millis(3),
            ..LinkFaults::default()
        };
        assert_eq!(net.lock().draw_delay(&point), Duration::from_millis(3));
    }
}
