//! # kv-model
//!
//! Model configurations, weight loading and backend-generic transformers whose attention runs
//! through any [`kv_core`] cache. This crate is at its start: it currently re-exports the cache
//! layer it builds on.

pub use kv_core;
