//! `tailgate loadgen`: realistic agent traces at a target rate, for benches, the load harness
//! and replay. [`generate`] makes the traces; the rest sends or writes them.

pub(crate) mod generate;
pub(crate) mod send;

pub use generate::{GeneratedTrace, Generator, Rng, SEQ_ATTRIBUTE, Shape, request_of, seq_of};
pub use send::read_requests;
pub(crate) use send::{LoadPlan, send, write_requests};
