//! [`ForwardContext`]: what every layer's attention over one piece of a pass shares (its
//! queries' positions, padding, the cache's pattern and rotation, the attention plan).

use super::*;

/// What attention over one piece of a forward pass needs in every layer, made once per pass
/// (one per piece in a ragged pass).
pub(super) struct ForwardContext<'a, B: Backend> {
    /// Cache positions of the piece's new tokens.
    pub(super) queries: Range<usize>,
    pub(super) padding: Option<&'a AttentionMask>,
    /// The pattern each layer's cached keys follow (one entry: every layer's); each layer
    /// narrows it by its own window ([`Transformer::layer_pattern`]).
    cache_patterns: Vec<AttentionPattern>,
    pub(super) rotation: KeyRotation,
    /// Whether the pass runs on the host ([`Transformer::runs_on_host`]), with the kernel
    /// threads free to share attention.
    pub(super) on_host: bool,
    /// The attention plan made for the last layer that needed one (its blocks of queries, the
    /// keys each reads, their masks folded for grouped-query attention), reused while the key
    /// positions and the pattern stay the same.
    pub(super) plan_memo: Option<(KeyPositions, AttentionPattern, AttentionPlan<B>)>,
}

impl<'a, B: Backend> ForwardContext<'a, B> {
    /// A context for queries at cache positions `queries`, through a cache whose layers' keys
    /// follow `cache_patterns` (one entry: all of them) and are rotated as `rotation` says.
    pub(super) fn new(
        queries: Range<usize>,
        padding: Option<&'a AttentionMask>,
        cache_patterns: Vec<AttentionPattern>,
        rotation: KeyRotation,
        on_host: bool,
    ) -> Self {
        Self {
            queries,
            padding,
            cache_patterns,
            rotation,
            on_host,
            plan_memo: None,
        }
    }

    /// The pattern layer `layer`'s cached keys follow.
    pub(super) fn cache_pattern(&self, layer: usize) -> AttentionPattern {
        match self.cache_patterns.as_slice() {
            [one] => *one,
            all => all.get(layer).copied().unwrap_or(AttentionPattern::Causal),
        }
    }

    /// The attention plan over `keys` under `pattern`, in blocks of `block_queries`, for
    /// queries laid out `[batch, kv_heads, groups]`.
    pub(super) fn plan_for(
        &mut self,
        keys: &KeyPositions,
        pattern: AttentionPattern,
        block_queries: usize,
        layout: [usize; 3],
        device: &B::Device,
    ) -> Result<&AttentionPlan<B>> {
        let stale = self
            .plan_memo
            .as_ref()
            .is_none_or(|(memo_keys, memo_pattern, _)| {
                memo_keys != keys || *memo_pattern != pattern
            });
        if stale {
            let plan = AttentionPlan::new(
                self.queries.clone(),
                keys,
                pattern,
                self.padding,
                block_queries,
                layout,
                device,
            )?;
            self.plan_memo = Some((keys.clone(), pattern, plan));
        }
        Ok(&self.plan_memo.as_ref().expect("planned above").2)
    }
}
