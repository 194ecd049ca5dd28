//! What a cache hands to attention after an update.

use std::ops::Range;

use burn::tensor::{backend::Backend, Tensor};

/// The absolute position (token index in the sequence) of every key/value slot in a [`KvView`].
///
/// Masks are built from these positions, so a cache may hand its slots over in any order
/// (a ring buffer hands them over in ring order) without a copy to sort them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPositions {
    /// Slot `i` holds position `range.start + i`.
    Contiguous(Range<usize>),
    /// Slot `i` holds position `positions[i]`.
    Slots(Vec<usize>),
}

impl KeyPositions {
    /// Number of slots.
    pub fn len(&self) -> usize {
        match self {
            KeyPositions::Contiguous(range) => range.len(),
            KeyPositions::Slots(positions) => positions.len(),
        }
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The position held by slot `slot`.
    ///
    /// # Panics
    /// If `slot >= self.len()`.
    pub fn get(&self, slot: usize) -> usize {
        match self {
            KeyPositions::Contiguous(range) => {
                assert!(slot < range.len(), "slot {slot} out of {}", range.len());
                range.start + slot
            }
            KeyPositions::Slots(positions) => positions[slot],
        }
    }

    /// All positions, slot by slot.
    pub fn to_vec(&self) -> Vec<usize> {
        match self {
            KeyPositions::Contiguous(range) => range.clone().collect(),
            KeyPositions::Slots(positions) => positions.clone(),
        }
    }
}

/// Keys and values that attention must read after an update, with the position of each slot.
///
/// Shapes: `keys` and `values` are `[batch, kv_heads, slots, head_dim]`, where slot `i` holds
/// position `positions.get(i)`.
///
/// Drop a view before the next update of the same cache: a cache writes in place only while it
/// owns the sole handle to its buffer, and a live view that shares the buffer forces a copy.
#[derive(Debug, Clone)]
pub struct KvView<B: Backend> {
    /// `[batch, kv_heads, slots, head_dim]`.
    pub keys: Tensor<B, 4>,
    /// `[batch, kv_heads, slots, head_dim]`.
    pub values: Tensor<B, 4>,
    /// Absolute position of each slot.
    pub positions: KeyPositions,
    /// Positions at which the queries of this update must be rotated, when the cache rotates
    /// keys itself (see [`crate::KeyRotation::AppliedByCache`]); `None` otherwise, and then queries
    /// are rotated at their absolute positions.
    pub query_rotary_positions: Option<Range<usize>>,
}

impl<B: Backend> KvView<B> {
    /// Number of key/value slots.
    pub fn slots(&self) -> usize {
        self.positions.len()
    }
}
