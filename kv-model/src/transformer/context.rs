//! [`ForwardContext`]: what every layer of one forward pass shares (positions, runs, rotary
//! angles, padding, the attention pattern and plan).

use super::*;

/// What every layer of one forward pass shares, made once per [`Transformer::forward`].
pub(super) struct ForwardContext<'a, B: Backend> {
    /// Cache positions of the new tokens.
    pub(super) queries: Range<usize>,
    /// Rotary / learned position of each new token, per batch row (or one shared row).
    pub(super) position_ids: Vec<Vec<usize>>,
    /// Runs of the new tokens computed apart where positions are independent
    /// ([`Transformer::runs`]).
    pub(super) runs: Vec<Range<usize>>,
    /// Cosines and sines at `position_ids` for the query heads and for the key heads, run by
    /// run, when the model rotates keys itself.
    pub(super) angles: Option<Vec<(RotaryAngles<B>, RotaryAngles<B>)>>,
    pub(super) padding: Option<&'a AttentionMask>,
    pub(super) pattern: AttentionPattern,
    pub(super) rotation: KeyRotation,
    /// Whether the pass runs on the host ([`Transformer::forward_on_host`]), with the kernel
    /// threads free to share attention.
    pub(super) on_host: bool,
    /// The attention plan made for the first layer (its blocks of queries, the keys each
    /// reads, their masks folded for grouped-query attention), reused while the key positions
    /// stay the same.
    pub(super) plan_memo: Option<(KeyPositions, AttentionPlan<B>)>,
}

impl<B: Backend> ForwardContext<'_, B> {
    /// The attention plan over `keys`, in blocks of `block_queries`, for queries laid out
    /// `[batch, kv_heads, groups]`.
    pub(super) fn plan_for(
        &mut self,
        keys: &KeyPositions,
        block_queries: usize,
        layout: [usize; 3],
        device: &B::Device,
    ) -> Result<&AttentionPlan<B>> {
        let stale = self
            .plan_memo
            .as_ref()
            .is_none_or(|(memo_keys, _)| memo_keys != keys);
        if stale {
            let plan = AttentionPlan::new(
                self.queries.clone(),
                keys,
                self.pattern,
                self.padding,
                block_queries,
                layout,
                device,
            )?;
            self.plan_memo = Some((keys.clone(), plan));
        }
        Ok(&self.plan_memo.as_ref().expect("planned above").1)
    }
}
