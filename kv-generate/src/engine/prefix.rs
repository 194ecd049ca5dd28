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
        let layers = if cached == 0 {
            Vec::new()
        } else {
            (0..config.num_layers)
                .map(|layer| {
                    let (keys, values) = self.store.read(layer, sequence);
                    (host(keys), host(values))
                })
                .collect()
        };
        self.store.free(sequence);
        SavedPrefix {
            tokens: tokens[..cached].to_vec(),
            block_size: self.store.block_size(),
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            layers,
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
            if let Err(e) = self.store.reserve(sequence, &saved.tokens[cached..]) {
                self.store.free(sequence);
                return Err(e.into());
            }
            let dims = [1, config.num_kv_heads, n, config.head_dim];
            let device = self.model.device();
            let tensor = |data: &[f32]| {
                burn::tensor::Tensor::<B, 4>::from_data(
                    burn::tensor::TensorData::new(data.to_vec(), dims),
                    device,
                )
                .narrow(2, cached, n - cached)
            };
            for (layer, (keys, vals)) in saved.layers.iter().enumerate() {
                self.store
                    .write(layer, sequence, cached, tensor(keys), tensor(vals));
            }
        }
        self.store.free(sequence);
        Ok(n)
    }
}
