//! tailgate: a tail-sampling OpenTelemetry trace collector.
//!
//! The data flow, one module per stage: [`receiver`] (OTLP in) → [`buffer`] (traces in
//! waiting) → [`decide`] (the policy chain) → [`export`] (OTLP out). [`config`] holds every
//! setting, [`telemetry`] the host's own metrics and health, [`app`] wires the stages together.

pub mod app;
pub mod buffer;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decide;
pub mod export;
pub mod loadgen;
pub mod otlp;
pub mod plugin;
pub mod receiver;
pub mod telemetry;
