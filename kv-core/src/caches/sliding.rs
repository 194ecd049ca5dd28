//! [`SlidingWindowCache`]: keeps the last `window` positions in a ring buffer.

use burn::tensor::{backend::Backend, Tensor};

use crate::caches::windowed::Windowed;
use crate::{error::Result, AttentionPattern, KvCache, KvView};

/// A cache that holds only the most recent `window` positions, as sliding-window attention
/// (Mistral-style) needs: a query at position `q` sees keys at `q - window < k <= q`.
///
/// Storage is a ring of `window` slots written in place; views hand the ring over in slot
/// order with the absolute position of each slot ([`crate::KeyPositions::Slots`]), and
/// [`crate::attention_mask`] with [`crate::AttentionPattern::SlidingWindow`] builds the matching
/// mask. A prompt longer than the window is attended in full (under the window mask) and only
/// its last `window` positions are kept.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::{KvCache, SlidingWindowCache};
///
/// let device = Default::default();
/// let mut cache = SlidingWindowCache::<NdArray>::new(4).unwrap();
/// for _ in 0..10 {
///     let k = Tensor::<NdArray, 4>::ones([1, 1, 1, 8], &device);
///     cache.update(k.clone(), k).unwrap();
/// }
/// assert_eq!((cache.seq_len(), cache.held_len()), (10, 4));
/// ```
#[derive(Debug, Clone)]
pub struct SlidingWindowCache<B: Backend> {
    ring: Windowed<B>,
}

impl<B: Backend> SlidingWindowCache<B> {
    /// A cache that keeps the last `window` positions (`window >= 1`).
    pub fn new(window: usize) -> Result<Self> {
        Ok(Self {
            ring: Windowed::new(0, window)?,
        })
    }

    /// Positions kept.
    pub fn window(&self) -> usize {
        self.ring.window()
    }

    /// Absolute positions held, oldest first.
    pub fn held_positions(&self) -> Vec<usize> {
        self.ring.held_positions()
    }
}

impl<B: Backend> KvCache<B> for SlidingWindowCache<B> {
    fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<KvView<B>> {
        let view = self.ring.update(keys, values)?;
        Ok(KvView {
            keys: view.keys,
            values: view.values,
            positions: view.positions,
            query_rotary_positions: None,
        })
    }

    fn seq_len(&self) -> usize {
        self.ring.seen()
    }

    fn held_len(&self) -> usize {
        self.ring.held_len()
    }

    fn max_len(&self) -> Option<usize> {
        Some(self.ring.window())
    }

    fn crop(&mut self, len: usize) -> Result<()> {
        self.ring.crop(len)
    }

    fn set_rewind(&mut self, positions: usize) {
        self.ring.set_rewind(positions)
    }

    fn select_batch(&mut self, indices: &[usize]) -> Result<()> {
        self.ring.select_batch(indices)
    }

    fn batch_size(&self) -> Option<usize> {
        self.ring.batch_size()
    }

    fn reset(&mut self) {
        self.ring.reset()
    }

    fn memory_bytes(&self) -> usize {
        self.ring.memory_bytes()
    }

    fn attention_pattern(&self) -> AttentionPattern {
        AttentionPattern::SlidingWindow {
            window: self.window(),
        }
    }
}
