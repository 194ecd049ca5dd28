//! The ring buffer shared by [`crate::SlidingWindowCache`] and [`crate::SinkCache`].
//!
//! The buffer has `sinks + window` slots. Position `p < sinks` lives in slot `p` forever;
//! position `p >= sinks` lives in slot `sinks + (p - sinks) % window`, so a new token
//! overwrites the oldest windowed one in place. A sliding window is the case `sinks == 0`.
//!
//! A ring that has wrapped cannot drop its last positions by moving its end back, as a dense
//! cache does: their slots hold them in place of the positions they evicted. Speculative
//! decoding needs exactly that (a pass writes guesses, the rejected ones must go), so a ring
//! can be asked to keep a short log of what it evicts ([`Windowed::set_rewind`]): the last
//! `rewind` positions to leave the window, written back into their slots when a crop brings
//! them into the window again. llama.cpp keeps extra cells in its sliding-window cache for the
//! same reason; here the view stays the window, so attention reads no more than before, and
//! what it costs is one copy of each evicted position while the log is on.

use burn::tensor::{backend::Backend, Tensor};

use crate::caches::buffer::{select_rows_checked, KvBuffer};
use crate::caches::kv_cache::check_update;
use crate::{error::Result, CacheError, KeyPositions};

/// What an update of a [`Windowed`] buffer returns: keys/values `[batch, kv_heads, slots, head_dim]`
/// and the absolute position of each slot.
pub(crate) struct WindowedView<B: Backend> {
    pub keys: Tensor<B, 4>,
    pub values: Tensor<B, 4>,
    pub positions: KeyPositions,
}

/// Keys and values `[batch, kv_heads, n, head_dim]` of the windowed positions `first..first + n`,
/// evicted from the ring and kept for a crop.
#[derive(Debug, Clone)]
struct EvictedRun<B: Backend> {
    first: usize,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
}

impl<B: Backend> EvictedRun<B> {
    fn end(&self) -> usize {
        self.first + self.keys.dims()[2]
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Windowed<B: Backend> {
    sinks: usize,
    window: usize,
    buffer: Option<KvBuffer<B>>,
    seen: usize,
    /// Positions a crop may drop after the ring wrapped (0: the log is off).
    rewind: usize,
    /// The last windowed positions evicted, oldest first, ending at `window_start(seen)`.
    evicted: Vec<EvictedRun<B>>,
}

impl<B: Backend> Windowed<B> {
    pub fn new(sinks: usize, window: usize) -> Result<Self> {
        if window == 0 {
            return Err(CacheError::InvalidConfig(
                "window must hold at least 1 position".into(),
            ));
        }
        Ok(Self {
            sinks,
            window,
            buffer: None,
            seen: 0,
            rewind: 0,
            evicted: Vec::new(),
        })
    }

    /// Keeps what the last `positions` evictions took, so that a crop may drop up to that many
    /// of the latest positions even after the ring wrapped; 0 turns the log off.
    pub fn set_rewind(&mut self, positions: usize) {
        self.rewind = positions;
        if positions == 0 {
            self.evicted.clear();
        }
    }

    /// Records the windowed positions `range`, which leave the window in an update of `new`
    /// keys and values starting at position `seen`: those before `seen` from their slots,
    /// the rest (new positions that never enter the ring) from `keys` and `values`.
    fn log_evicted(
        &mut self,
        range: std::ops::Range<usize>,
        buffer: &KvBuffer<B>,
        keys: &Tensor<B, 4>,
        values: &Tensor<B, 4>,
    ) {
        if self.rewind == 0 || range.is_empty() {
            return;
        }
        let seen = self.seen;
        let old = range.start..range.end.min(seen);
        if !old.is_empty() {
            let (keys, values) = self.read_positions(buffer, old.clone());
            self.evicted.push(EvictedRun {
                first: old.start,
                keys,
                values,
            });
        }
        let new = range.start.max(seen)..range.end;
        if !new.is_empty() {
            let (offset, len) = (new.start - seen, new.len());
            self.evicted.push(EvictedRun {
                first: new.start,
                keys: keys.clone().narrow(2, offset, len),
                values: values.clone().narrow(2, offset, len),
            });
        }
        // Drop the runs that lie wholly before the last `rewind` evictions.
        let keep_from = range.end.saturating_sub(self.rewind);
        self.evicted.retain(|run| run.end() > keep_from);
    }

    /// Keys and values of the held windowed positions `range`, read as the runs of consecutive
    /// slots they occupy (one read for a decode step's eviction, not a gather of the ring).
    fn read_positions(
        &self,
        buffer: &KvBuffer<B>,
        range: std::ops::Range<usize>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let batch = buffer.dims()[0];
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut position = range.start;
        while position < range.end {
            let slot = self.slot_of(position);
            let len = (range.end - position).min(self.slots() - slot);
            let (k, v) = buffer.read(0..batch, slot..slot + len);
            keys.push(k);
            values.push(v);
            position += len;
        }
        match keys.len() {
            1 => (keys.remove(0), values.remove(0)),
            _ => (Tensor::cat(keys, 2), Tensor::cat(values, 2)),
        }
    }

    /// The oldest evicted position the log can bring back.
    fn log_start(&self) -> usize {
        let end = self.window_start(self.seen);
        self.evicted.first().map_or(end, |run| run.first.min(end))
    }

    pub fn sinks(&self) -> usize {
        self.sinks
    }

    pub fn window(&self) -> usize {
        self.window
    }

    pub fn seen(&self) -> usize {
        self.seen
    }

    fn slots(&self) -> usize {
        self.sinks + self.window
    }

    fn slot_of(&self, position: usize) -> usize {
        if position < self.sinks {
            position
        } else {
            self.sinks + (position - self.sinks) % self.window
        }
    }

    /// First position of the window part, given `seen` positions.
    fn window_start(&self, seen: usize) -> usize {
        seen.saturating_sub(self.window).max(self.sinks)
    }

    /// Positions held, oldest first.
    pub fn held_positions(&self) -> Vec<usize> {
        let sinks = 0..self.seen.min(self.sinks);
        let window = self.window_start(self.seen)..self.seen;
        sinks.chain(window).collect()
    }

    pub fn held_len(&self) -> usize {
        self.seen.min(self.sinks) + self.seen.saturating_sub(self.sinks).min(self.window)
    }

    pub fn batch_size(&self) -> Option<usize> {
        self.buffer.as_ref().map(|b| b.dims()[0])
    }

    /// Appends `[batch, kv_heads, new, head_dim]` and returns what the new queries must read.
    pub fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<WindowedView<B>> {
        let held_shape = self.buffer.as_ref().map(|b| {
            let [batch, heads, _, dim] = b.dims();
            [batch, heads, dim]
        });
        let [batch, heads, new, head_dim] = check_update(&keys, &values, held_shape)?;
        let buffer = match self.buffer.take() {
            Some(buffer) => buffer,
            None => KvBuffer::zeros([batch, heads, self.slots(), head_dim], &keys.device()),
        };
        let seen = self.seen;
        let end = seen + new;

        // Nothing evicted yet: slot == position, so the view is a plain prefix.
        if end <= self.slots() {
            let buffer = buffer.write(seen, keys, values);
            let (keys, values) = buffer.read(0..batch, 0..end);
            self.buffer = Some(buffer);
            self.seen = end;
            return Ok(WindowedView {
                keys,
                values,
                positions: KeyPositions::Contiguous(0..end),
            });
        }

        // One token into a full buffer: overwrite the oldest windowed slot, read the whole ring.
        if new == 1 {
            let evicted = self.window_start(seen)..self.window_start(end);
            self.log_evicted(evicted, &buffer, &keys, &values);
            let buffer = buffer.write(self.slot_of(seen), keys, values);
            self.seen = end;
            let positions = self.slot_positions();
            let (keys, values) = buffer.read(0..batch, 0..self.slots());
            self.buffer = Some(buffer);
            return Ok(WindowedView {
                keys,
                values,
                positions: KeyPositions::Slots(positions),
            });
        }

        // Several tokens that evict what their own earliest queries still need: attention reads
        // the held positions (in order) followed by all new ones; the buffer keeps the newest.
        let held = self.held_positions();
        let (view_keys, view_values) = if held.is_empty() {
            (keys.clone(), values.clone())
        } else {
            let slots: Vec<usize> = held.iter().map(|&p| self.slot_of(p)).collect();
            let (old_keys, old_values) = buffer.gather_slots(0..batch, &slots);
            (
                Tensor::cat(vec![old_keys, keys.clone()], 2),
                Tensor::cat(vec![old_values, values.clone()], 2),
            )
        };
        let evicted = self.window_start(seen)..self.window_start(end);
        self.log_evicted(evicted, &buffer, &keys, &values);
        let mut buffer = buffer;
        // New sink positions.
        if seen < self.sinks {
            let count = (self.sinks - seen).min(new);
            buffer = buffer.write(
                seen,
                keys.clone().narrow(2, 0, count),
                values.clone().narrow(2, 0, count),
            );
        }
        // The newest windowed positions, written around the ring.
        let first = self.window_start(end).max(seen);
        let mut position = first;
        while position < end {
            let slot = self.slot_of(position);
            let run = (end - position).min(self.slots() - slot);
            let offset = position - seen;
            buffer = buffer.write(
                slot,
                keys.clone().narrow(2, offset, run),
                values.clone().narrow(2, offset, run),
            );
            position += run;
        }
        self.buffer = Some(buffer);
        self.seen = end;
        // A sliding ring holds one run of positions just before the new ones: the view is then
        // one contiguous run too, which attention reads without gathering slot by slot.
        let positions = match held.first() {
            Some(&first) if first + held.len() == seen => KeyPositions::Contiguous(first..end),
            None => KeyPositions::Contiguous(seen..end),
            _ => KeyPositions::Slots(held.into_iter().chain(seen..end).collect()),
        };
        Ok(WindowedView {
            keys: view_keys,
            values: view_values,
            positions,
        })
    }

    /// Position held by every slot of a full buffer.
    fn slot_positions(&self) -> Vec<usize> {
        let start = self.window_start(self.seen);
        let mut positions: Vec<usize> = (0..self.sinks).collect();
        positions.resize(self.slots(), 0);
        for position in start..self.seen {
            positions[self.slot_of(position)] = position;
        }
        positions
    }

    /// Forgets positions `len..`; after the ring wrapped, the positions they evicted come back
    /// from the log, which must reach back to `len`'s window.
    pub fn crop(&mut self, len: usize) -> Result<()> {
        if len >= self.seen {
            return Ok(());
        }
        if self.seen > self.slots() {
            // `len`'s window, less what the ring still holds; positions from `len` on go.
            let needed = self.window_start(len)..self.window_start(self.seen).min(len);
            if needed.start < self.log_start() {
                return Err(CacheError::CropEvicted {
                    requested: len,
                    oldest_kept: self.log_start(),
                    seen: self.seen,
                });
            }
            self.restore(needed);
        }
        self.seen = len;
        Ok(())
    }

    /// Writes the logged positions `range` back into their slots and drops them from the log.
    fn restore(&mut self, range: std::ops::Range<usize>) {
        let Some(mut buffer) = self.buffer.take() else {
            return;
        };
        for run in &self.evicted {
            let mut position = range.start.max(run.first);
            let end = range.end.min(run.end());
            while position < end {
                let slot = self.slot_of(position);
                let len = (end - position).min(self.slots() - slot);
                let offset = position - run.first;
                buffer = buffer.write(
                    slot,
                    run.keys.clone().narrow(2, offset, len),
                    run.values.clone().narrow(2, offset, len),
                );
                position += len;
            }
        }
        self.buffer = Some(buffer);
        // What is back in the ring leaves the log.
        let start = range.start;
        self.evicted.retain(|run| run.first < start);
        for run in &mut self.evicted {
            if run.end() > start {
                let len = start - run.first;
                run.keys = run.keys.clone().narrow(2, 0, len);
                run.values = run.values.clone().narrow(2, 0, len);
            }
        }
    }

    pub fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        select_rows_checked(&mut self.buffer, indices)?;
        // The log's rows are no longer the buffer's.
        self.evicted.clear();
        Ok(())
    }

    pub fn reset(&mut self) {
        self.buffer = None;
        self.seen = 0;
        self.evicted.clear();
    }

    pub fn memory_bytes(&self) -> usize {
        self.buffer.as_ref().map_or(0, KvBuffer::bytes)
    }
}
