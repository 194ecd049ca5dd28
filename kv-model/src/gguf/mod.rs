//! GGUF files (llama.cpp's format), versions 2 and 3: header, metadata, tensor directory, and
//! tensors dequantized to f32.
//!
//! Layout: magic `GGUF`, version (u32), tensor count and metadata count (u64), the metadata
//! key/value pairs, one entry per tensor (name, dimensions innermost first, type, offset), then
//! the tensor data, aligned to `general.alignment` (32 by default). Everything is
//! little-endian. The reader checks every length against the bytes that remain, so a truncated
//! or corrupt file is an error, never a panic or a huge allocation.
//!
//! [`GgufFile::open`] reads the header and the tensor directory only; each tensor's bytes are
//! read from the file when asked for, so loading a model holds one tensor of the file at a
//! time beside what it has built, not the whole file.

mod convert;
mod dequant;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use convert::{config_from_gguf, weights_from_gguf};
pub use dequant::{dequantize, first_non_finite, GgmlType};

use crate::error::{ModelError, Result};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// u8.
    U8(u8),
    /// i8.
    I8(i8),
    /// u16.
    U16(u16),
    /// i16.
    I16(i16),
    /// u32.
    U32(u32),
    /// i32.
    I32(i32),
    /// f32.
    F32(f32),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values of one type.
    Array(Vec<MetaValue>),
    /// u64.
    U64(u64),
    /// i64.
    I64(i64),
    /// f64.
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The items, if it is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// Where one tensor is and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name (llama.cpp naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first (`[cols, rows]` for a matrix), as GGUF writes them.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape outermost first (PyTorch order): `[rows, cols]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file: its metadata and tensor directory, and where to read its tensors.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    data: Data,
    data_start: usize,
}

/// Where a file's tensor bytes come from.
#[derive(Debug, Clone)]
enum Data {
    /// The whole file in memory ([`GgufFile::parse`]).
    Memory(Vec<u8>),
    /// The file on disk, `len` bytes long, read a tensor at a time ([`GgufFile::open`]).
    Disk { file: Arc<File>, len: u64 },
}

impl Data {
    fn len(&self) -> u64 {
        match self {
            Data::Memory(bytes) => bytes.len() as u64,
            Data::Disk { len, .. } => *len,
        }
    }
}

/// Bytes read first for a header (metadata and tensor directory): a Llama 3 tokenizer's 128k
/// tokens and merges take about 8 MB. A header that does not parse within them is read again
/// four times longer, up to the whole file.
const HEADER_READ: u64 = 16 << 20;

impl GgufFile {
    /// Reads and parses `path`'s header and tensor directory; tensors are read when asked for.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |e| ModelError::io(path, e);
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut prefix = HEADER_READ.min(len);
        loop {
            let mut head = vec![0; prefix as usize];
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            file.read_exact(&mut head).map_err(io)?;
            match Self::parse_header(&head, path) {
                Ok(mut parsed) => {
                    parsed.data = Data::Disk {
                        file: Arc::new(file),
                        len,
                    };
                    parsed.check_tensors()?;
                    return Ok(parsed);
                }
                Err(_) if prefix < len => prefix = prefix.saturating_mul(4).min(len),
                Err(e) => return Err(e),
            }
        }
    }

    /// Parses a whole file held in memory; `path` is used in error messages.
    pub fn parse(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        let mut parsed = Self::parse_header(&bytes, path)?;
        parsed.data = Data::Memory(bytes);
        parsed.check_tensors()?;
        Ok(parsed)
    }

    /// Every tensor's data lies inside the file.
    fn check_tensors(&self) -> Result<()> {
        for info in &self.tensors {
            self.tensor_range(info)?;
        }
        Ok(())
    }

    /// The header and tensor directory from the file's first bytes, with no tensor data yet.
    fn parse_header(bytes: &[u8], path: &Path) -> Result<Self> {
        let mut reader = Reader { bytes, at: 0, path };
        let magic = reader.take(4)?;
        if magic != b"GGUF" {
            return Err(reader.error(format!("bad magic {magic:?}, expected \"GGUF\"")));
        }
        let version = reader.u32()?;
        if !(2..=3).contains(&version) {
            return Err(reader.error(format!("version {version} is not supported (2 and 3 are)")));
        }
        let tensor_count = reader.u64()?;
        let kv_count = reader.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = reader.string()?;
            let kind = reader.u32()?;
            let value = reader.value(kind, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::new();
        for _ in 0..tensor_count {
            // Each entry takes at least 24 bytes: refuse counts the file cannot hold.
            reader.need(24)?;
            let name = reader.string()?;
            let n_dims = reader.u32()?;
            if n_dims > 4 {
                return Err(reader.error(format!(
                    "tensor `{name}` has {n_dims} dimensions (at most 4)"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| reader.u64())
                .collect::<Result<Vec<_>>>()?;
            // The element count must be representable; the data check below bounds it further.
            let elements = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
            if elements.is_none_or(|n| n > usize::MAX as u64 / 4) {
                return Err(reader.error(format!(
                    "tensor `{name}` has impossible dimensions {dims:?}"
                )));
            }
            let type_id = reader.u32()?;
            let ggml_type =
                GgmlType::from_id(type_id).ok_or_else(|| ModelError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    dtype: format!(
                        "ggml type {type_id} ({} are read)",
                        GgmlType::ALL.map(GgmlType::name).join(", ")
                    ),
                })?;
            let offset = reader.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(value) => match value.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(
                        reader.error(format!("general.alignment {value:?} is not a power of two"))
                    )
                }
            },
        };
        let data_start = reader.at.div_ceil(alignment) * alignment;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            // The caller puts the data in place before any tensor is read.
            data: Data::Memory(Vec::new()),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// The tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor, checked against the file's length (read from disk for a
    /// file [`GgufFile::open`] opened).
    ///
    /// # Errors
    /// The range runs past the end of the file, or a block's scale (or a float tensor's
    /// value) is NaN or infinite: the error names the tensor, its type and the byte offset.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<Cow<'_, [u8]>> {
        let range = self.tensor_range(info)?;
        let bytes = self.read_range(range.clone())?;
        if let Some((at, value)) = first_non_finite(info.ggml_type, &bytes) {
            let what = match info.ggml_type {
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => "value",
                _ => "block scale",
            };
            return Err(ModelError::Gguf {
                path: self.path.clone(),
                message: format!(
                    "tensor `{}`: {} {what} at file offset {} is {value}; the file is corrupt",
                    info.name,
                    info.ggml_type,
                    range.start + at as u64
                ),
            });
        }
        Ok(bytes)
    }

    /// The bytes of `range`, borrowed from memory or read from disk.
    fn read_range(&self, range: std::ops::Range<u64>) -> Result<Cow<'_, [u8]>> {
        match &self.data {
            Data::Memory(bytes) => Ok(Cow::Borrowed(
                &bytes[range.start as usize..range.end as usize],
            )),
            Data::Disk { file, .. } => {
                let io = |e| ModelError::io(&self.path, e);
                let mut bytes = vec![0; (range.end - range.start) as usize];
                let mut file: &File = file;
                file.seek(SeekFrom::Start(range.start)).map_err(io)?;
                file.read_exact(&mut bytes).map_err(io)?;
                Ok(Cow::Owned(bytes))
            }
        }
    }

    /// Where a tensor's bytes lie in the file, checked against the file's length.
    fn tensor_range(&self, info: &TensorInfo) -> Result<std::ops::Range<u64>> {
        let fail = |message: String| ModelError::Gguf {
            path: self.path.clone(),
            message: format!("tensor `{}`: {message}", info.name),
        };
        let len = info.ggml_type.byte_len(info.elements()).ok_or_else(|| {
            fail(format!(
                "{} elements do not fill whole {} blocks of {} values",
                info.elements(),
                info.ggml_type,
                info.ggml_type.block().0
            ))
        })?;
        let start = (self.data_start as u64).checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.data.len() => Ok(start..end),
            _ => Err(fail(format!(
                "{} data at offset {} + {len} bytes runs past the end of the file ({} bytes); the file is truncated",
                info.ggml_type,
                info.offset,
                self.data.len()
            ))),
        }
    }

    /// A tensor dequantized to f32, shape outermost first.
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(info)?;
        Ok(dequantize(info.ggml_type, &bytes, info.elements() as usize))
    }
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

/// Nesting allowed for arrays of arrays.
const MAX_DEPTH: usize = 4;

impl<'a> Reader<'a> {
    fn error(&self, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            message: format!("{message} (at byte {})", self.at),
        }
    }

    fn need(&self, len: u64) -> Result<()> {
        let left = (self.bytes.len() - self.at) as u64;
        if len > left {
            return Err(self.error(format!(
                "needs {len} more bytes but {left} remain; the file is truncated"
            )));
        }
        Ok(())
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        self.need(len as u64)?;
        let slice = &self.bytes[self.at..self.at + len];
        self.at += len;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        self.need(len)?;
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.error("a string is not valid UTF-8".into()))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<MetaValue> {
        Ok(match kind {
            0 => MetaValue::U8(u8::from_le_bytes(self.array()?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                other => return Err(self.error(format!("bool value {other}"))),
            },
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.error("arrays nested too deeply".into()));
                }
                let item_kind = self.u32()?;
                let count = self.u64()?;
                // Every item takes at least one byte.
                self.need(count)?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_kind, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.error(format!("unknown metadata value type {other}"))),
        })
    }
}
