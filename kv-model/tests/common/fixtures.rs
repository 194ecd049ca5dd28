//! The transformers fixtures (`kv-model/tests/fixtures`) and their expected outputs, for every
//! crate's tests: kv-model's include this file as part of `common`, kv-generate's and
//! kv-bench's with `#[path = "../../kv-model/tests/common/fixtures.rs"] mod fixtures;`.
#![allow(dead_code)] // each test binary uses some of these

use std::path::PathBuf;

use serde_json::Value;

/// `kv-model/tests/fixtures`. Cargo sets `CARGO_MANIFEST_DIR` (the crate under test) when it
/// runs a test; a test binary run by hand on another machine (`scripts/gpu-check.sh`) sets it
/// to that checkout's crate.
pub fn fixtures() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("../kv-model/tests/fixtures")
}

/// A JSON file under the fixtures.
pub fn read_json(name: &str) -> Value {
    let path = fixtures().join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A fixture model's outputs from transformers (`scripts/make_fixtures.py`).
pub fn expected(model: &str) -> Value {
    read_json(&format!("{model}/expected.json"))
}

/// A JSON array of token ids.
pub fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// A JSON array of numbers.
pub fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}
