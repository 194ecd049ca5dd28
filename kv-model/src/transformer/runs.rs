//! A prompt's runs of positions: cut apart where positions are independent (norms,
//! projections, rotary, MLP) and computed on rayon's threads.

use super::*;

impl<B: Backend> Transformer<B> {
    /// The runs of positions `0..seq` that a forward pass computes apart wherever positions
    /// are independent (norms, projections, rotary, MLP). With [`Execution::Parallel`] and a
    /// prompt of at least two [`PromptSplit::min_positions_per_run`], up to two runs per
    /// thread of rayon's pool, which the threads take in turn; CPU backends run their
    /// element-wise kernels on the calling thread, so this is what puts a prompt's norms and
    /// activations on every core. Otherwise one run of everything.
    pub(super) fn runs(&self, seq: usize) -> Vec<Range<usize>> {
        let min = self.split.min_positions_per_run.max(1);
        let tasks = (2 * rayon::current_num_threads()).min(seq / min);
        if self.execution != Execution::Parallel || tasks < 2 {
            #[allow(clippy::single_range_in_vec_init)] // one run: all the positions
            return vec![0..seq];
        }
        (0..tasks)
            .map(|i| i * seq / tasks..(i + 1) * seq / tasks)
            .collect()
    }

    /// `f(index, run, input)` for every run and its input, on rayon's threads when there are
    /// several, in run order.
    pub(super) fn map_runs<I: Send, T: Send>(
        &self,
        runs: &[Range<usize>],
        inputs: Vec<I>,
        f: impl Fn(usize, &Range<usize>, I) -> T + Sync,
    ) -> Vec<T> {
        debug_assert_eq!(runs.len(), inputs.len());
        let tasks: Vec<_> = inputs.into_iter().zip(runs).enumerate().collect();
        self.map_tasks(runs.len() > 1, tasks, |(i, (input, run))| f(i, run, input))
    }

    /// `f` over `inputs`, on rayon's threads when `parallel` (one input per task), in order.
    pub(super) fn map_tasks<I: Send, T: Send>(
        &self,
        parallel: bool,
        inputs: Vec<I>,
        f: impl Fn(I) -> T + Sync,
    ) -> Vec<T> {
        if !parallel {
            return inputs.into_iter().map(f).collect();
        }
        inputs.into_par_iter().with_max_len(1).map(&f).collect()
    }
}

/// Positions `run` of `x` `[batch, seq, _]` (`x` itself when the run is all of them).
pub(super) fn narrow_run<B: Backend>(x: &Tensor<B, 3>, run: &Range<usize>) -> Tensor<B, 3> {
    if run.len() == x.dims()[1] {
        x.clone()
    } else {
        x.clone().narrow(1, run.start, run.len())
    }
}

/// Run outputs joined along `dim`, the positions (one run is returned as it is).
pub(super) fn join_runs<B: Backend, const D: usize>(
    mut parts: Vec<Tensor<B, D>>,
    dim: usize,
) -> Tensor<B, D> {
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        Tensor::cat(parts, dim)
    }
}
