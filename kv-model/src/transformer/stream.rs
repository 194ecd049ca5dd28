//! [`Stream`]: the residual stream of one forward pass (and any per-position activations), cut
//! into runs of positions, each in host memory or on the backend's device.
//!
//! Where a run lives follows the weights that touch it: a product whose matrix lives on the
//! host (kv-kernels) takes its input there and leaves its output there, a product on the
//! device leaves a tensor. So a model whose matrices are all on the host keeps its stream in
//! host memory from the first product to the logits (see [`crate::host`]), and a GPU model
//! keeps it on the device; the block code above is the same for both. Moving a run changes no
//! value: downloads and uploads copy f32s, and a residual sum is one IEEE addition per value
//! wherever it runs.

use super::*;

/// One run of per-position activations, `[batch, len, width]`.
#[derive(Debug, Clone)]
pub(super) enum Run<B: Backend> {
    /// In host memory, row-major.
    Host {
        /// `batch * len * width` values.
        values: Vec<f32>,
        /// `[batch, len, width]`.
        dims: [usize; 3],
    },
    /// A backend tensor.
    Device(Tensor<B, 3>),
}

impl<B: Backend> Run<B> {
    /// `[batch, len, width]`.
    pub(super) fn dims(&self) -> [usize; 3] {
        match self {
            Run::Host { dims, .. } => *dims,
            Run::Device(t) => t.dims(),
        }
    }

    /// The values, row-major, downloaded if on the device.
    pub(super) fn into_host(self) -> Vec<f32> {
        match self {
            Run::Host { values, .. } => values,
            Run::Device(t) => host::download(t),
        }
    }

    /// The values as a tensor, uploaded if on the host.
    pub(super) fn into_device(self, device: &B::Device) -> Tensor<B, 3> {
        match self {
            Run::Host { values, dims } => host::upload(values, dims, device),
            Run::Device(t) => t,
        }
    }

    /// A host run of `values` `[batch, len, width]`.
    fn host(values: Vec<f32>, [batch, len]: [usize; 2], width: usize) -> Self {
        Run::Host {
            values,
            dims: [batch, len, width],
        }
    }

    /// `linear(norm(x))`: on the host when the product's matrix lives there (the norm with
    /// it, as a decode step computes it), else on the device.
    pub(super) fn norm_linear(
        &self,
        norm: &Norm<B>,
        linear: &Linear<B>,
        device: &B::Device,
    ) -> Self {
        let [batch, len, width] = self.dims();
        if linear.is_host() {
            let h = match self {
                Run::Host { values, .. } => norm.forward_host(values, width),
                Run::Device(t) => norm.forward_host(&host::download(t.clone()), width),
            };
            let y = linear.forward_host(&h, batch * len);
            return Run::host(y, [batch, len], linear.out_features());
        }
        Run::Device(linear.forward(norm.forward(self.clone().into_device(device))))
    }

    /// `linear(x)`, where the product's matrix lives.
    pub(super) fn linear(self, linear: &Linear<B>, device: &B::Device) -> Self {
        let [batch, len, _] = self.dims();
        if linear.is_host() {
            let y = linear.forward_host(&self.into_host(), batch * len);
            return Run::host(y, [batch, len], linear.out_features());
        }
        Run::Device(linear.forward(self.into_device(device)))
    }

    /// `x + y`: on the device when both are there, else on the host.
    pub(super) fn add(self, y: Self) -> Self {
        match (self, y) {
            (Run::Device(x), Run::Device(y)) => Run::Device(x + y),
            (x, y) => {
                let dims = x.dims();
                let mut values = x.into_host();
                host::add_assign(&mut values, &y.into_host());
                Run::Host { values, dims }
            }
        }
    }

    /// `norm(x)`, where the run is.
    pub(super) fn norm(self, norm: &Norm<B>) -> Self {
        match self {
            Run::Host { values, dims } => Run::Host {
                values: norm.forward_host(&values, dims[2]),
                dims,
            },
            Run::Device(t) => Run::Device(norm.forward(t)),
        }
    }

    /// `x + post(mlp(norm(x)))` (`post` the optional norm on the MLP's output): a block's
    /// second half, on the host when the MLP's matrices live there.
    pub(super) fn mlp_residual(
        self,
        norm: &Norm<B>,
        mlp: &Mlp<B>,
        post: Option<&Norm<B>>,
        device: &B::Device,
    ) -> Self {
        if !mlp.is_host() {
            let x = self.into_device(device);
            let h = mlp.forward(norm.forward(x.clone()));
            let h = match post {
                Some(post) => post.forward(h),
                None => h,
            };
            return Run::Device(x + h);
        }
        let dims @ [batch, len, width] = self.dims();
        let mut x = self.into_host();
        let mut h = mlp.forward_host(&norm.forward_host(&x, width), batch * len);
        if let Some(post) = post {
            h = post.forward_host(&h, width);
        }
        host::add_assign(&mut x, &h);
        Run::Host { values: x, dims }
    }

    /// Positions `positions` of every batch row of the run, `[batch, positions.len(), width]`,
    /// where the run is (a copy on the host, a view on the device).
    pub(super) fn positions(&self, positions: Range<usize>) -> Self {
        let [batch, len, width] = self.dims();
        if positions == (0..len) {
            return self.clone();
        }
        match self {
            Run::Host { values, .. } => {
                let rows = (0..batch).flat_map(|b| {
                    let at = (b * len + positions.start) * width;
                    values[at..at + positions.len() * width].iter().copied()
                });
                Run::host(rows.collect(), [batch, positions.len()], width)
            }
            Run::Device(t) => Run::Device(t.clone().narrow(1, positions.start, positions.len())),
        }
    }
}

/// The residual stream of a forward pass: one [`Run`] per run of positions
/// ([`Transformer::runs`]), in order.
pub(super) type Stream<B> = Vec<Run<B>>;

/// The runs of a stream joined along the positions into one: on the host when every run is
/// there, else on the device.
pub(super) fn join<B: Backend>(mut runs: Stream<B>, device: &B::Device) -> Run<B> {
    if runs.len() == 1 {
        return runs.remove(0);
    }
    if runs.iter().all(|r| matches!(r, Run::Host { .. })) {
        let [batch, _, width] = runs[0].dims();
        let len: usize = runs.iter().map(|r| r.dims()[1]).sum();
        let mut values = Vec::with_capacity(batch * len * width);
        for b in 0..batch {
            for run in &runs {
                let Run::Host { values: v, dims } = run else {
                    unreachable!("every run is on the host")
                };
                values.extend_from_slice(&v[b * dims[1] * width..(b + 1) * dims[1] * width]);
            }
        }
        return Run::host(values, [batch, len], width);
    }
    let tensors = runs.into_iter().map(|r| r.into_device(device)).collect();
    Run::Device(Tensor::cat(tensors, 1))
}
