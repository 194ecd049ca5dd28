//! A prompt's cached blocks copied out of the engine's pool and put back ([`SavedPrefix`]):
//! what a saved prompt cache holds (llama.cpp's slot save), across restarts and processes.

use burn::tensor::backend::Backend;

use super::Engine;
use crate::error::{GenerateError, Result};

/// A prompt's cached keys and values, every layer, copied out of the pool: what a saved prompt
/// cache holds (llama.cpp's slot save), to be put back with [`Engine::restore_prefix`] in this
/// process or another one running the same model.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedPrefix {
    /// Token ids of the saved positions: whole blocks, from the prompt's start.
    pub tokens: Vec<u32>,
    /// Positions per block of the pool it came from.
    pub block_size: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Per layer, keys then values, each `[kv_heads, tokens, head_dim]` f32, row-major.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// Per layer, the first position it holds: 0, but for a sliding-window layer of a prefix
    /// longer than its window, whose pool gave back the positions no later query sees (they
    /// are zeros in `layers`).
    pub layer_starts: Vec<usize>,
}

impl<B: Backend> Engine<'_, B> {
    /// Copies the longest run of `tokens`'s full blocks that the prefix cache holds out of the
    /// pool (nothing is computed: run the prompt first). Empty when none is cached.
    pub fn save_prefix(&mut self, tokens: &[u32]) -> SavedPrefix {
        let config = self.model.config();
        // A store never counts a prompt's last position as cached (its logits are needed), so
        // ask with one placeholder token more: every full block of `tokens` may count.
        let probe: Vec<u32> = tokens.iter().copied().chain([0]).collect();
        let (sequence, cached) = self.store.add_sequence(&probe);
        let host = |t: burn::tensor::Tensor<B, 4>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .into_vec()
                .expect("converted to f32")
        };
        let (heads, d) = (config.num_kv_heads, config.head_dim);
        // A layer's held positions, zeros before them: `[kv_heads, cached, head_dim]`.
        let padded = |held: Vec<f32>, start: usize| -> Vec<f32> {
            let rows = cached - start;
            let mut all = vec![0.0; heads * cached * d];
            for h in 0..heads {
                all[(h * cached + start) * d..(h + 1) * cached * d]
                    .copy_from_slice(&held[h * rows * d..(h + 1) * rows * d]);
            }
            all
        };
        let (mut layers, mut layer_starts) = (Vec::new(), Vec::new());
        if cached > 0 {
            for layer in 0..config.num_layers {
                let start = self.store.held_positions(layer, sequence).start;
                let (keys, values) = self.store.read(layer, sequence);
                layers.push((padded(host(keys), start), padded(host(values), start)));
                layer_starts.push(start);
            }
        }
        self.store.free(sequence);
        SavedPrefix {
            tokens: tokens[..cached].to_vec(),
            block_size: self.store.block_size(),
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            layers,
            layer_starts,
        }
    }

    /// Puts `saved` back in the pool as cached blocks, so later prompts that start with its
    /// tokens skip computing them (positions the pool still holds are kept, not rewritten).
    /// Returns the positions it covers. The blocks are cached, not held: like any unreferenced
    /// block they go when the pool needs room.
    ///
    /// # Errors
    /// A prefix of another shape (layers, heads, head size, lengths), another block size, ids
    /// outside the vocabulary, or a pool with no room for it now.
    pub fn restore_prefix(&mut self, saved: &SavedPrefix) -> Result<usize> {
        let config = self.model.config();
        let n = saved.tokens.len();
        let expect = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(GenerateError::InvalidRequest(format!(
                    "the saved prefix has {what} {got}, this engine's model and pool need {want}"
                )))
            }
        };
        expect("block size", saved.block_size, self.store.block_size())?;
        expect("key/value heads", saved.kv_heads, config.num_kv_heads)?;
        expect("head size", saved.head_dim, config.head_dim)?;
        if n == 0 {
            return Ok(0);
        }
        expect("layers", saved.layers.len(), config.num_layers)?;
        expect("layer starts", saved.layer_starts.len(), config.num_layers)?;
        expect("positions not in whole blocks:", n % saved.block_size, 0)?;
        let values = config.num_kv_heads * n * config.head_dim;
        for (keys, vals) in &saved.layers {
            expect("values per layer", keys.len(), values)?;
            expect("values per layer", vals.len(), values)?;
        }
        config.check_token_ids(0, &saved.tokens)?;
        let probe: Vec<u32> = saved.tokens.iter().copied().chain([0]).collect();
        let (sequence, cached) = self.store.add_sequence(&probe);
        if cached < n {
            if let Err(e) = self
                .store
                .reserve_restored(sequence, &saved.tokens[cached..])
            {
                self.store.free(sequence);
                return Err(e.into());
            }
            // Each layer's positions it holds now (a sliding layer: its window's before the
            // next position), which the saved prefix must have.
            let firsts: Vec<usize> = (0..config.num_layers)
                .map(|layer| self.store.held_positions(layer, sequence).start.max(cached))
                .collect();
            if let Some(layer) = (0..config.num_layers).find(|&l| firsts[l] < saved.layer_starts[l])
            {
                self.store.free(sequence);
                return Err(GenerateError::InvalidRequest(format!(
                    "the saved prefix holds layer {layer} from position {}, this pool needs it \
                     from {}",
                    saved.layer_starts[layer], firsts[layer]
                )));
            }
            let dims = [1, config.num_kv_heads, n, config.head_dim];
            let device = self.model.device();
            let tensor = |data: &[f32], first: usize| {
                burn::tensor::Tensor::<B, 4>::from_data(
                    burn::tensor::TensorData::new(data.to_vec(), dims),
                    device,
                )
                .narrow(2, first, n - first)
            };
            for (layer, (keys, vals)) in saved.layers.iter().enumerate() {
                let first = firsts[layer];
                if first < n {
                    let (k, v) = (tensor(keys, first), tensor(vals, first));
                    self.store.write(layer, sequence, first, k, v);
                }
            }
        }
        self.store.free(sequence);
        Ok(n)
    }
}
