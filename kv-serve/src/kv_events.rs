//! KV events: what the engine's prefix cache stores and forgets, published over ZeroMQ the way
//! vLLM publishes them, so that a router in front of several replicas (llm-d's router, the
//! Gateway API Inference Extension's precise prefix-cache scorer, NVIDIA Dynamo's KV router)
//! sends each prompt to the replica that already holds its prefix.
//!
//! **The wire**, as vLLM's `ZmqEventPublisher` has it:
//!
//! - A PUB socket. An endpoint with `*` (`tcp://*:5557`) is bound, any other
//!   (`tcp://router:5557`) is connected to: the router binds and replicas, which come and go,
//!   connect.
//! - Each message has three frames: the topic (`--kv-events-topic`, empty by default), an
//!   8-byte big-endian sequence number counting from 0, and a msgpack payload.
//! - The payload is one batch per engine step, an array `[ts, events, data_parallel_rank]`.
//!   Each event is a tagged array:
//!   - `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`
//!     for full blocks that became findable, consecutive blocks of one sequence in one event
//!     (`token_ids` holds `block_size` tokens per hash);
//!   - `["BlockRemoved", block_hashes, medium]` for cached blocks whose slots went to new work;
//!   - `["AllBlocksCleared"]` after `POST /reset_prefix_cache`.
//! - A block's hash is the first 64 bits of its SHA-256 chain hash ([`BlockHash::short`]): the
//!   same for the block's whole life, and never given to a speculative guess (guesses are
//!   registered only once verified). `parent_block_hash` is `nil` for a sequence's first
//!   block. `lora_id` is always `nil`; `medium` is `"GPU"` or `"CPU"`, where the pool lives.
//! - An optional replay ROUTER socket (`--kv-events-replay`): a subscriber that missed batches
//!   sends a start sequence number (8 bytes, big-endian) and gets back every batch still held
//!   from there, as `[sequence, payload]`, then the end marker `[0xff * 8, ""]`. The last
//!   `--kv-events-buffer` batches are held.
//!
//! What it costs: nothing when off. When on, the pool copies each reported block's token ids
//! once, and a step's events are encoded and sent on a thread of their own, never on the
//! engine's. Delivery is ZeroMQ's PUB: a slow or absent subscriber loses messages, and
//! the sequence numbers and the replay socket are how it notices and catches up.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kv_core::{BlockEvent, BlockHash};
use serde::Serialize;

/// The sequence number that ends a replay.
pub const END_OF_REPLAY: [u8; 8] = [0xff; 8];

/// Batches a replay socket holds by default (vLLM's `buffer_steps`).
pub const DEFAULT_REPLAY_BUFFER: usize = 10_000;

/// Where and how to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsConfig {
    /// The PUB endpoint, `tcp://HOST:PORT`: bound when `HOST` is `*`, else connected to.
    pub endpoint: String,
    /// The replay ROUTER endpoint, always bound (`tcp://*:5558`); `None` for no replay.
    pub replay: Option<String>,
    /// Every message's first frame (routers key replicas by it, e.g. `kv@POD_IP:PORT@MODEL`).
    pub topic: String,
    /// Batches held for replay.
    pub buffer: usize,
    /// Where the pool lives: `"GPU"` or `"CPU"` (each event's `medium`).
    pub medium: String,
    /// Positions per block (each `BlockStored`'s `block_size`).
    pub block_size: usize,
}

/// Why publishing could not start.
#[derive(Debug, thiserror::Error)]
pub enum KvEventsError {
    /// An endpoint that is not `tcp://HOST:PORT`.
    #[error("the KV events endpoint `{endpoint}` is not tcp://HOST:PORT (e.g. tcp://*:5557 to bind, tcp://router:5557 to connect)")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
    },
    /// The socket could not bind or connect.
    #[error("the KV events socket on `{endpoint}` failed: {message}")]
    Socket {
        /// The endpoint.
        endpoint: String,
        /// ZeroMQ's error.
        message: String,
    },
}

/// The engine's side of the publisher: hands each step's events over without waiting.
#[derive(Debug, Clone)]
pub struct KvEventSink {
    sender: Sender<Vec<BlockEvent>>,
}

impl KvEventSink {
    /// Queues one step's events as one batch (nothing is sent for an empty step).
    pub fn publish(&self, events: Vec<BlockEvent>) {
        if !events.is_empty() {
            // Fails only once the publisher has stopped (the server is shutting down).
            let _ = self.sender.send(events);
        }
    }
}

/// One event as the wire has it: a msgpack array that starts with its tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum WireEvent {
    /// `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`.
    Stored(
        &'static str,
        Vec<u64>,
        Option<u64>,
        Vec<u32>,
        usize,
        Option<u32>,
        String,
    ),
    /// `["BlockRemoved", block_hashes, medium]`.
    Removed(&'static str, Vec<u64>, String),
    /// `["AllBlocksCleared"]`.
    Cleared((&'static str,)),
}

/// The wire's events for one step's `events`, in order: consecutive stored blocks of one
/// sequence (each the parent of the next) share one `BlockStored`, consecutive removals one
/// `BlockRemoved`.
///
/// ```
/// use kv_core::{BlockEvent, BlockHash};
/// use kv_serve::kv_events::{wire_events, WireEvent};
///
/// let a = BlockHash::new(None, &[1, 2], b"");
/// let b = BlockHash::new(Some(&a), &[3, 4], b"");
/// let events = [
///     BlockEvent::Stored { hash: a, parent: None, tokens: vec![1, 2] },
///     BlockEvent::Stored { hash: b, parent: Some(a), tokens: vec![3, 4] },
/// ];
/// let wire = wire_events(&events, 2, "CPU");
/// assert_eq!(
///     wire,
///     [WireEvent::Stored("BlockStored", vec![a.short(), b.short()], None, vec![1, 2, 3, 4], 2, None, "CPU".into())]
/// );
/// ```
pub fn wire_events(events: &[BlockEvent], block_size: usize, medium: &str) -> Vec<WireEvent> {
    let mut wire: Vec<WireEvent> = Vec::new();
    // The last stored block's hash, while the last wire event is a `BlockStored`.
    let mut chain: Option<BlockHash> = None;
    for event in events {
        match event {
            BlockEvent::Stored {
                hash,
                parent,
                tokens,
            } => {
                if let (Some(WireEvent::Stored(_, hashes, _, ids, ..)), true) =
                    (wire.last_mut(), parent.is_some() && *parent == chain)
                {
                    hashes.push(hash.short());
                    ids.extend_from_slice(tokens);
                } else {
                    wire.push(WireEvent::Stored(
                        "BlockStored",
                        vec![hash.short()],
                        parent.map(|p| p.short()),
                        tokens.clone(),
                        block_size,
                        None,
                        medium.to_string(),
                    ));
                }
                chain = Some(*hash);
                continue;
            }
            BlockEvent::Removed { hash } => {
                if let Some(WireEvent::Removed(_, hashes, _)) = wire.last_mut() {
                    hashes.push(hash.short());
                } else {
                    wire.push(WireEvent::Removed(
                        "BlockRemoved",
                        vec![hash.short()],
                        medium.to_string(),
                    ));
                }
            }
            BlockEvent::Cleared => wire.push(WireEvent::Cleared(("AllBlocksCleared",))),
        }
        chain = None;
    }
    wire
}

/// A batch's msgpack payload: `[ts, events, data_parallel_rank]` (rank 0: one engine).
pub fn encode_batch(ts: f64, events: &[WireEvent]) -> Vec<u8> {
    rmp_serde::to_vec(&(ts, events, 0u32)).expect("plain values encode")
}

/// Binds or connects the sockets and starts the publishing thread; the returned sink feeds
/// it. A connected endpoint need not be up yet: ZeroMQ connects (and reconnects) in the
/// background. Publishing stops when every sink is dropped.
///
/// # Errors
/// An endpoint that is not `tcp://HOST:PORT`, or one that cannot be bound.
pub fn start(config: KvEventsConfig) -> Result<KvEventSink, KvEventsError> {
    let context = zmq::Context::new();
    let socket_error = |endpoint: &str| {
        let endpoint = endpoint.to_string();
        move |e: zmq::Error| KvEventsError::Socket {
            endpoint,
            message: e.to_string(),
        }
    };
    let publisher = context
        .socket(zmq::PUB)
        .map_err(socket_error(&config.endpoint))?;
    // vLLM's high-water mark: a subscriber may fall this many batches behind before losing any.
    publisher
        .set_sndhwm(100_000)
        .map_err(socket_error(&config.endpoint))?;
    let endpoint = socket_address(&config.endpoint)?;
    if config.endpoint.contains('*') {
        publisher.bind(&endpoint)
    } else {
        publisher.connect(&endpoint)
    }
    .map_err(socket_error(&config.endpoint))?;
    let replay = match &config.replay {
        None => None,
        Some(replay_endpoint) => {
            let socket = context
                .socket(zmq::ROUTER)
                .map_err(socket_error(replay_endpoint))?;
            socket
                .bind(&socket_address(replay_endpoint)?)
                .map_err(socket_error(replay_endpoint))?;
            Some(socket)
        }
    };
    let (sender, receiver) = channel();
    let publisher = Publisher {
        config,
        publisher,
        replay,
        held: VecDeque::new(),
        next_sequence: 0,
    };
    std::thread::Builder::new()
        .name("kv-serve-kv-events".into())
        .spawn(move || publisher.run(receiver))
        .map_err(|e| KvEventsError::Socket {
            endpoint: "(the publishing thread)".into(),
            message: e.to_string(),
        })?;
    Ok(KvEventSink { sender })
}

/// `endpoint` in the form libzmq binds (`*` is every interface, `0.0.0.0`).
fn socket_address(endpoint: &str) -> Result<String, KvEventsError> {
    let bad = || KvEventsError::Endpoint {
        endpoint: endpoint.to_string(),
    };
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    let host = if host == "*" { "0.0.0.0" } else { host };
    Ok(format!("tcp://{host}:{port}"))
}

/// How long the publishing thread waits for a batch before it looks at the replay socket.
const REPLAY_POLL: Duration = Duration::from_millis(20);

/// The thread that owns the sockets (libzmq sockets belong to one thread).
struct Publisher {
    config: KvEventsConfig,
    publisher: zmq::Socket,
    replay: Option<zmq::Socket>,
    /// The last batches sent, with their sequence numbers, for replay.
    held: VecDeque<(u64, Vec<u8>)>,
    next_sequence: u64,
}

impl Publisher {
    fn run(mut self, batches: Receiver<Vec<BlockEvent>>) {
        if self.replay.is_none() {
            // Nothing to poll: sleep until a batch comes.
            while let Ok(events) = batches.recv() {
                self.send(&events);
            }
            return;
        }
        loop {
            match batches.recv_timeout(REPLAY_POLL) {
                Ok(events) => self.send(&events),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.answer_replays();
        }
    }

    fn send(&mut self, events: &[BlockEvent]) {
        let wire = wire_events(events, self.config.block_size, &self.config.medium);
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let payload = encode_batch(ts, &wire);
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let frames = [
            self.config.topic.as_bytes(),
            &sequence.to_be_bytes(),
            &payload,
        ];
        if let Err(e) = self.publisher.send_multipart(frames, 0) {
            eprintln!("kv-serve: publishing KV events batch {sequence} failed: {e}");
        }
        if self.replay.is_some() && self.config.buffer > 0 {
            if self.held.len() == self.config.buffer {
                self.held.pop_front();
            }
            self.held.push_back((sequence, payload));
        }
    }

    /// Answers each waiting `[identity, "", start]` with every held batch from `start` on,
    /// then the end marker; anything else is ignored (a client's mistake must not stop the
    /// publisher).
    fn answer_replays(&mut self) {
        let Some(socket) = &self.replay else {
            return;
        };
        while let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) {
            let [identity, delimiter, start] = frames.as_slice() else {
                eprintln!(
                    "kv-serve: ignoring a KV events replay request of {} frames (expected an \
                     8-byte start sequence number from a REQ or DEALER socket)",
                    frames.len().saturating_sub(1)
                );
                continue;
            };
            let Ok(start) = <[u8; 8]>::try_from(start.as_slice()).map(u64::from_be_bytes) else {
                eprintln!(
                    "kv-serve: ignoring a KV events replay request whose start is not 8 bytes"
                );
                continue;
            };
            let replies = self
                .held
                .iter()
                .filter(|(sequence, _)| *sequence >= start)
                .map(|(sequence, payload)| (sequence.to_be_bytes(), payload.as_slice()))
                .chain(std::iter::once((END_OF_REPLAY, &[][..])));
            for (sequence, payload) in replies {
                let reply = [
                    identity.as_slice(),
                    delimiter.as_slice(),
                    &sequence,
                    payload,
                ];
                if let Err(e) = socket.send_multipart(reply, 0) {
                    eprintln!("kv-serve: a KV events replay answer failed: {e}");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_tcp_host_port_and_star_is_every_interface() {
        assert_eq!(
            socket_address("tcp://*:5557").unwrap(),
            "tcp://0.0.0.0:5557"
        );
        assert_eq!(
            socket_address("tcp://router:5557").unwrap(),
            "tcp://router:5557"
        );
        for bad in [
            "ipc:///tmp/x",
            "tcp://host",
            "tcp://:5",
            "tcp://h:port",
            "5557",
        ] {
            assert!(
                matches!(socket_address(bad), Err(KvEventsError::Endpoint { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn removals_merge_and_a_new_chain_starts_a_new_stored_event() {
        let a = BlockHash::new(None, &[1], b"");
        let b = BlockHash::new(Some(&a), &[2], b"");
        let c = BlockHash::new(None, &[3], b"");
        let stored = |hash: BlockHash, parent: Option<BlockHash>, token: u32| BlockEvent::Stored {
            hash,
            parent,
            tokens: vec![token],
        };
        let events = [
            stored(a, None, 1),
            BlockEvent::Removed { hash: c },
            BlockEvent::Removed { hash: a },
            stored(b, Some(a), 2),
            stored(c, None, 3),
            BlockEvent::Cleared,
        ];
        let wire = wire_events(&events, 1, "GPU");
        let medium = || "GPU".to_string();
        assert_eq!(
            wire,
            [
                WireEvent::Stored(
                    "BlockStored",
                    vec![a.short()],
                    None,
                    vec![1],
                    1,
                    None,
                    medium()
                ),
                WireEvent::Removed("BlockRemoved", vec![c.short(), a.short()], medium()),
                // b's parent a is not the last block stored in this run: its own event.
                WireEvent::Stored(
                    "BlockStored",
                    vec![b.short()],
                    Some(a.short()),
                    vec![2],
                    1,
                    None,
                    medium()
                ),
                WireEvent::Stored(
                    "BlockStored",
                    vec![c.short()],
                    None,
                    vec![3],
                    1,
                    None,
                    medium()
                ),
                WireEvent::Cleared(("AllBlocksCleared",)),
            ]
        );
    }

    #[test]
    fn a_batch_is_a_msgpack_array_of_timestamp_events_and_rank() {
        let a = BlockHash::new(None, &[7, 8], b"");
        let wire = wire_events(
            &[BlockEvent::Stored {
                hash: a,
                parent: None,
                tokens: vec![7, 8],
            }],
            2,
            "CPU",
        );
        let bytes = encode_batch(1.5, &wire);
        let value: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        let expected = serde_json::json!([
            1.5,
            [["BlockStored", [a.short()], null, [7, 8], 2, null, "CPU"]],
            0
        ]);
        assert_eq!(value, expected);
    }
}
