//! `tailgate loadgen`: realistic agent traces at a target rate, for benches, the load harness
//! and replay. [`generate`] makes the traces; the rest sends or writes them.

pub mod generate;
pub mod send;

pub use generate::{
    GeneratedTrace, Generator, Rng, SEQ_ATTRIBUTE, Shape, Traits, request_of, seq_of,
};
pub use send::{LoadPlan, LoadgenError, Summary, read_requests, send, write_requests};
