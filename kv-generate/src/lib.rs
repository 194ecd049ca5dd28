//! # kv-generate
//!
//! The generation engine of kv-cache. The binaries pick a burn backend by cargo feature;
//! [`backend`] names the choices and says which were compiled in.

pub mod backend;
