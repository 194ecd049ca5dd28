//! Shared test helpers: deterministic tensors, host copies, and the reference cache that every
//! kind is compared against (keys and values rebuilt by plain concatenation).
#![allow(dead_code)]

use burn::tensor::{Tensor, TensorData};
use burn_ndarray::NdArray;
use kv_core::{KvView, ModelCache};

pub type B = NdArray<f32>;

pub fn device() -> burn_ndarray::NdArrayDevice {
    Default::default()
}

/// A tensor of `dims` filled with values in [-1, 1) from `seed` (splitmix64).
pub fn rand4(dims: [usize; 4], seed: u64) -> Tensor<B, 4> {
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let data: Vec<f32> = (0..dims.iter().product::<usize>())
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_data(TensorData::new(data, dims), &device())
}

/// A host copy of a 4-D tensor.
#[derive(Debug, Clone)]
pub struct Host {
    pub dims: [usize; 4],
    pub data: Vec<f32>,
}

impl Host {
    pub fn of(t: &Tensor<B, 4>) -> Self {
        Self {
            dims: t.dims(),
            data: t.to_data().to_vec::<f32>().unwrap(),
        }
    }

    /// The head_dim-long row at `[b, h, s, ..]`.
    pub fn row(&self, b: usize, h: usize, s: usize) -> &[f32] {
        let [_, heads, seq, dim] = self.dims;
        let start = ((b * heads + h) * seq + s) * dim;
        &self.data[start..start + dim]
    }
}

/// Largest absolute difference between two tensors of one shape.
pub fn max_diff(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (Host::of(a), Host::of(b));
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Everything ever appended, rebuilt by concatenation: what every cache must agree with.
#[derive(Debug, Clone, Default)]
pub struct Reference {
    pub keys: Option<Tensor<B, 4>>,
    pub values: Option<Tensor<B, 4>>,
}

impl Reference {
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        self.keys = Some(match self.keys.take() {
            Some(old) => Tensor::cat(vec![old, k], 2),
            None => k,
        });
        self.values = Some(match self.values.take() {
            Some(old) => Tensor::cat(vec![old, v], 2),
            None => v,
        });
    }

    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    pub fn crop(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        if len == 0 {
            *self = Self::default();
            return;
        }
        self.keys = self.keys.take().map(|k| k.narrow(2, 0, len));
        self.values = self.values.take().map(|v| v.narrow(2, 0, len));
    }

    pub fn select(&mut self, indices: &[usize]) {
        let index = Tensor::from_data(
            TensorData::new(
                indices.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [indices.len()],
            ),
            &device(),
        );
        self.keys = self.keys.take().map(|k| k.select(0, index.clone()));
        self.values = self.values.take().map(|v| v.select(0, index));
    }

    pub fn keys(&self) -> Tensor<B, 4> {
        self.keys.clone().expect("reference is not empty")
    }

    pub fn values(&self) -> Tensor<B, 4> {
        self.values.clone().expect("reference is not empty")
    }

    /// Asserts that every slot of `view` holds, bit for bit, the reference at its position.
    pub fn assert_matches(&self, view: &KvView<B>) {
        let (rk, rv) = (Host::of(&self.keys()), Host::of(&self.values()));
        let (vk, vv) = (Host::of(&view.keys), Host::of(&view.values));
        let [batch, heads, slots, dim] = vk.dims;
        assert_eq!(
            [batch, heads, dim],
            [rk.dims[0], rk.dims[1], rk.dims[3]],
            "view shape"
        );
        assert_eq!(slots, view.positions.len(), "one position per slot");
        for slot in 0..slots {
            let p = view.positions.get(slot);
            for b in 0..batch {
                for h in 0..heads {
                    assert_eq!(
                        vk.row(b, h, slot),
                        rk.row(b, h, p),
                        "key slot {slot} (position {p}) b{b} h{h}"
                    );
                    assert_eq!(
                        vv.row(b, h, slot),
                        rv.row(b, h, p),
                        "value slot {slot} (position {p}) b{b} h{h}"
                    );
                }
            }
        }
    }
}

/// Asserts a whole legacy cache equals per-layer references.
pub fn assert_legacy_equal(
    cache: &ModelCache<B, kv_core::DynamicCache<B>>,
    layers: &[(Tensor<B, 4>, Tensor<B, 4>)],
) {
    let legacy = cache.to_legacy();
    assert_eq!(legacy.len(), layers.len());
    for ((k, v), (rk, rv)) in legacy.iter().zip(layers) {
        assert_eq!(max_diff(k, rk), 0.0);
        assert_eq!(max_diff(v, rv), 0.0);
    }
}
