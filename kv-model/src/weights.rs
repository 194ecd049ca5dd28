//! Weights on the host, by Hugging Face name: dense f32, or (from a GGUF file) matrices kept
//! in the blocks the file stores them in, widened only when a dense tensor is asked for.

use std::collections::HashMap;

use kv_kernels::{Format, Matrix};

use crate::error::{ModelError, Result};
use crate::placement::WeightFormat;

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

/// A stored tensor: dense f32 values, or a 2-D matrix in its file's block format.
#[derive(Debug, Clone, PartialEq)]
enum Stored {
    Dense(HostTensor),
    /// `[rows, cols]` in PyTorch's order (`nn.Linear`'s `[out, in]`).
    Matrix(Matrix),
}

impl Stored {
    fn shape(&self) -> Vec<usize> {
        match self {
            Stored::Dense(t) => t.shape.clone(),
            Stored::Matrix(m) => vec![m.rows(), m.cols()],
        }
    }
}

/// Named host tensors, with the name of their source for error messages.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    source_name: String,
    tensors: HashMap<String, Stored>,
    notes: Vec<String>,
}

impl Weights {
    /// An empty set; `source_name` (a path, usually) appears in errors.
    pub fn new(source_name: impl Into<String>) -> Self {
        Self {
            source_name: source_name.into(),
            tensors: HashMap::new(),
            notes: Vec::new(),
        }
    }

    /// One-line notices about how the weights were read (a type requantized at load, say),
    /// for a program to show its user.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Adds a notice (see [`Weights::notes`]).
    pub fn add_note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Where these weights came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(name.into(), Stored::Dense(tensor));
    }

    /// Adds or replaces a 2-D tensor kept in its stored format (`[rows, cols]`, PyTorch order).
    pub fn insert_matrix(&mut self, name: impl Into<String>, matrix: Matrix) {
        self.tensors.insert(name.into(), Stored::Matrix(matrix));
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

    /// Reorders the rows of the 2-D tensor `name` (the entries of a 1-D one): row `i` of the
    /// result is row `order[i]` of the stored one. Dense tensors and matrices in blocks alike
    /// (whole rows move, so blocks stay intact).
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] if there is no `name`; [`ModelError::TensorShape`] if it
    /// does not have `order.len()` rows.
    pub fn permute_rows(&mut self, name: &str, order: &[usize]) -> Result<()> {
        let stored = self
            .tensors
            .get_mut(name)
            .ok_or_else(|| ModelError::MissingTensor {
                source_name: self.source_name.clone(),
                tensor: name.into(),
            })?;
        let shape = stored.shape();
        if shape.first() != Some(&order.len()) || shape.len() > 2 {
            let mut expected = shape.clone();
            if let Some(rows) = expected.first_mut() {
                *rows = order.len();
            }
            return Err(ModelError::TensorShape {
                source_name: self.source_name.clone(),
                tensor: name.into(),
                expected,
                found: shape,
            });
        }
        *stored = match stored {
            Stored::Matrix(m) => Stored::Matrix(m.select_rows(order)),
            Stored::Dense(t) => {
                let cols = shape.get(1).copied().unwrap_or(1);
                let data = order
                    .iter()
                    .flat_map(|&r| t.data[r * cols..(r + 1) * cols].iter().copied())
                    .collect();
                Stored::Dense(HostTensor::new(shape, data))
            }
        };
        Ok(())
    }

    /// Removes `name`, checking its shape.
    fn take_stored(&mut self, name: &str, expected: &[usize]) -> Result<Stored> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                source_name: self.source_name.clone(),
                tensor: name.into(),
            })?;
        if tensor.shape() != expected {
            return Err(ModelError::TensorShape {
                source_name: self.source_name.clone(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: tensor.shape(),
            });
        }
        Ok(tensor)
    }

    /// Removes and returns `name` as dense f32, checking its shape.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        Ok(match self.take_stored(name, expected)? {
            Stored::Dense(t) => t,
            Stored::Matrix(m) => HostTensor::new(vec![m.rows(), m.cols()], m.to_f32()),
        })
    }

    /// Removes and returns the 2-D tensor `name` (`[rows, cols]`) as a matrix in `format`:
    /// a stored matrix as it is where the format allows, anything else converted. A row width
    /// the format's blocks do not divide (a k-quant's 256 into a 576-wide row) keeps the
    /// stored matrix, or f32 for a dense tensor, as llama.cpp's quantizer falls back.
    pub fn take_matrix(
        &mut self,
        name: &str,
        [rows, cols]: [usize; 2],
        format: WeightFormat,
    ) -> Result<Matrix> {
        let stored = self.take_stored(name, &[rows, cols])?;
        let source = self.source_name.clone();
        let fits = |f: Format| cols.is_multiple_of(f.block_values());
        let matrix = match (stored, format.kernel_format()) {
            (Stored::Matrix(m), None) => m,
            (Stored::Matrix(m), Some(f)) if fits(f) => m.convert(f),
            (Stored::Matrix(m), Some(_)) => m,
            (Stored::Dense(t), f) => {
                let f = f.filter(|&f| fits(f)).unwrap_or(Format::F32);
                Matrix::from_f32(f, rows, cols, &t.data).map_err(|e| ModelError::Kernel {
                    source_name: source.clone(),
                    tensor: name.into(),
                    source: e,
                })?
            }
        };
        Ok(matrix)
    }
}
