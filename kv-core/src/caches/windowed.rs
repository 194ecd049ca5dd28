//! The ring buffer shared by [`crate::SlidingWindowCache`] and [`crate::SinkCache`].
//!
//! The buffer has `sinks + window` slots. Position `p < sinks` lives in slot `p` forever;
//! position `p >= sinks` lives in slot `sinks + (p - sinks) % window`, so a new token
//! overwrites the oldest windowed one in place. A sliding window is the case `sinks == 0`.

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

#[derive(Debug, Clone)]
pub(crate) struct Windowed<B: Backend> {
    sinks: usize,
    window: usize,
    buffer: Option<KvBuffer<B>>,
    seen: usize,
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
        })
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

    pub fn crop(&mut self, len: usize) -> Result<()> {
        if len >= self.seen {
            return Ok(());
        }
        if self.seen > self.slots() {
            return Err(CacheError::CropEvicted {
                requested: len,
                oldest_kept: self.window_start(self.seen),
                seen: self.seen,
            });
        }
        self.seen = len;
        Ok(())
    }

    pub fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        select_rows_checked(&mut self.buffer, indices)
    }

    pub fn reset(&mut self) {
        self.buffer = None;
        self.seen = 0;
    }

    pub fn memory_bytes(&self) -> usize {
        self.buffer.as_ref().map_or(0, KvBuffer::bytes)
    }
}
