//! Where a [`Trace`](crate::Trace)'s data comes from: the host's `trace`
//! interface on Wasm, an in-memory trace natively. Both backends expose the
//! same inherent methods, mirroring the WIT interface one to one, so
//! `trace.rs` is written once.

#[cfg(target_arch = "wasm32")]
mod wasm;
#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::{Backend, attr_to_wit, summary_from_wit};

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::Backend;
