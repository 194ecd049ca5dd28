//! [`SinkCache`]: attention sinks plus a sliding window (StreamingLLM).

use burn::tensor::{backend::Backend, Tensor};

use crate::caches::windowed::Windowed;
use crate::{
    error::Result, AttentionPattern, KeyPositions, KeyRotation, KvCache, KvView, RotaryTable,
};

/// Where a [`SinkCache`] places the keys it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkPositions {
    /// StreamingLLM: keys are stored before rotation and rotated on every read at their rank
    /// in the cache (sinks first, then the window oldest to newest), with the model's own
    /// rotary table, so the positions the model sees stay below `sinks + window` however
    /// long the text. Needs a rotary model; see [`KeyRotation::AppliedByCache`].
    CacheRanks,
    /// Keys stay as the caller gave them, at their positions in the text. This is the only
    /// choice for models with learned absolute positions (GPT-2), whose positions then run
    /// up to the model's limit (`n_positions`) and no further.
    TextPositions,
}

/// A cache that keeps the first `sinks` positions forever and the last `window` positions in a
/// ring, so generation can run past the model's context at constant memory (StreamingLLM).
///
/// # Positions and rotary models
/// StreamingLLM gives each cached token its position *inside the cache*, not in the text: once
/// the window slides, a key that was at text position 900 may sit at cache position 5. Built
/// with [`SinkCache::with_rotary`], this cache does that itself: callers pass keys **before**
/// rotation, the cache stores them unrotated and rotates them on every read at their cache rank
/// (sinks first, then the window oldest to newest), and [`KvView::query_rotary_positions`] gives
/// the ranks at which the new queries must be rotated. Rotating on read costs one pass over the
/// `sinks + window` held keys per update, bounded whatever the sequence length; storing rotated
/// keys instead would need the same pass to re-rotate them each time the window moves.
/// Until the cache first evicts, cache ranks equal text positions, so it then matches a plain
/// cache exactly. Built with [`SinkCache::new`] (no rotary), keys are stored as given and the
/// mask is built from text positions, which suits models with learned absolute positions.
///
/// ```
/// use burn::tensor::Tensor;
/// use burn_ndarray::NdArray;
/// use kv_core::{KvCache, SinkCache};
///
/// let device = Default::default();
/// let mut cache = SinkCache::<NdArray>::new(2, 3).unwrap();
/// for _ in 0..10 {
///     let k = Tensor::<NdArray, 4>::ones([1, 1, 1, 8], &device);
///     cache.update(k.clone(), k).unwrap();
/// }
/// assert_eq!(cache.held_positions(), vec![0, 1, 7, 8, 9]);
/// ```
#[derive(Debug, Clone)]
pub struct SinkCache<B: Backend> {
    ring: Windowed<B>,
    rotary: Option<RotaryTable<B>>,
}

impl<B: Backend> SinkCache<B> {
    /// Keeps `sinks` first positions and `window` (>= 1) last ones; keys stored as given.
    pub fn new(sinks: usize, window: usize) -> Result<Self> {
        Ok(Self {
            ring: Windowed::new(sinks, window)?,
            rotary: None,
        })
    }

    /// Like [`SinkCache::new`], but the cache applies rotary embeddings itself at cache ranks
    /// ([`KeyRotation::AppliedByCache`]).
    pub fn with_rotary(sinks: usize, window: usize, rotary: RotaryTable<B>) -> Result<Self> {
        Ok(Self {
            ring: Windowed::new(sinks, window)?,
            rotary: Some(rotary),
        })
    }

    /// Sink positions kept.
    pub fn sinks(&self) -> usize {
        self.ring.sinks()
    }

    /// Window positions kept.
    pub fn window(&self) -> usize {
        self.ring.window()
    }

    /// Absolute positions held, oldest first.
    pub fn held_positions(&self) -> Vec<usize> {
        self.ring.held_positions()
    }
}

/// Rank of each slot's position among the view's positions (its position inside the cache).
fn cache_ranks(positions: &KeyPositions) -> Vec<usize> {
    let positions = positions.to_vec();
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    positions
        .iter()
        .map(|p| sorted.binary_search(p).expect("position is in the list"))
        .collect()
}

impl<B: Backend> KvCache<B> for SinkCache<B> {
    fn update(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<KvView<B>> {
        let new = keys.dims()[2];
        let view = self.ring.update(keys, values)?;
        let Some(rotary) = self.rotary.as_mut() else {
            return Ok(KvView {
                keys: view.keys,
                values: view.values,
                positions: view.positions,
                query_rotary_positions: None,
            });
        };
        let slots = view.positions.len();
        let keys = rotary.apply(view.keys, &cache_ranks(&view.positions));
        Ok(KvView {
            keys,
            values: view.values,
            positions: view.positions,
            // The new tokens are the newest positions, hence the last ranks.
            query_rotary_positions: Some(slots - new..slots),
        })
    }

    fn seq_len(&self) -> usize {
        self.ring.seen()
    }

    fn held_len(&self) -> usize {
        self.ring.held_len()
    }

    fn max_len(&self) -> Option<usize> {
        Some(self.ring.sinks() + self.ring.window())
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

    fn key_rotation(&self) -> KeyRotation {
        if self.rotary.is_some() {
            KeyRotation::AppliedByCache
        } else {
            KeyRotation::AppliedByCaller
        }
    }

    fn attention_pattern(&self) -> AttentionPattern {
        AttentionPattern::Sinks {
            sinks: self.sinks(),
            window: self.window(),
        }
    }
}
