//! kv-core's integration tests, one module per concern, in one test binary (as separate files
//! under `tests/` each would be a crate of its own, compiling every cache kind again).

#[path = "../common/mod.rs"]
mod common;

mod in_place;
mod operations;
mod paged;
mod properties;
