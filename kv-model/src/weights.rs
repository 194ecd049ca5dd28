//! Weights on the host, by Hugging Face name, in f32, whatever file they came from.

use std::collections::HashMap;

use crate::error::{ModelError, Result};

/// A dense f32 tensor in host memory, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first (PyTorch order).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `shape` holding `data`.
    ///
    /// # Panics
    /// If the lengths disagree (a bug in the caller, never bad input).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "host tensor size"
        );
        Self { shape, data }
    }

    /// The transpose of a 2-D tensor: `[rows, cols]` to `[cols, rows]`.
    pub fn transposed(&self) -> Self {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut data = vec![0.0; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = self.data[r * cols + c];
            }
        }
        Self::new(vec![cols, rows], data)
    }

    /// Columns `start..start + len` of a 2-D tensor.
    pub fn columns(&self, start: usize, len: usize) -> Self {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let data = (0..rows)
            .flat_map(|r| {
                self.data[r * cols + start..r * cols + start + len]
                    .iter()
                    .copied()
            })
            .collect();
        Self::new(vec![rows, len], data)
    }

    /// 2-D tensors placed side by side: `[rows, a] + [rows, b]` to `[rows, a + b]`.
    pub fn concat_columns(parts: &[HostTensor]) -> Self {
        let rows = parts[0].shape[0];
        let cols: usize = parts.iter().map(|p| p.shape[1]).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for part in parts {
                let c = part.shape[1];
                data.extend_from_slice(&part.data[r * c..(r + 1) * c]);
            }
        }
        Self::new(vec![rows, cols], data)
    }

    /// 1-D tensors joined end to end.
    pub fn concat(parts: &[HostTensor]) -> Self {
        let data: Vec<f32> = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Self::new(vec![data.len()], data)
    }
}

/// Named host tensors, with the name of their source for error messages.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    source_name: String,
    tensors: HashMap<String, HostTensor>,
}

impl Weights {
    /// An empty set; `source_name` (a path, usually) appears in errors.
    pub fn new(source_name: impl Into<String>) -> Self {
        Self {
            source_name: source_name.into(),
            tensors: HashMap::new(),
        }
    }

    /// Where these weights came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Removes and returns `name`, checking its shape.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                source_name: self.source_name.clone(),
                tensor: name.into(),
            })?;
        if tensor.shape != expected {
            return Err(ModelError::TensorShape {
                source_name: self.source_name.clone(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: tensor.shape,
            });
        }
        Ok(tensor)
    }

    /// [`Weights::take`] for a tensor that may be absent.
    pub fn take_optional(&mut self, name: &str, expected: &[usize]) -> Result<Option<HostTensor>> {
        if self.contains(name) {
            self.take(name, expected).map(Some)
        } else {
            Ok(None)
        }
    }
}
