//! kv-generate's integration tests, one module per concern, in one test binary (as separate
//! files under `tests/` each would be a crate of its own, compiling the model and the engine
//! again).

#[path = "../../../kv-model/tests/common/fixtures.rs"]
mod fixtures;

mod cli;
mod engine;
mod engine_speculative;
mod generate;
mod speculative;
