//! End-to-end tests: the real `tailgate` binary over real sockets on 127.0.0.1.

mod agent;
mod author;
mod browser;
mod cli;
mod conformance;
mod cors;
mod crash;
mod diskfull;
mod exporter;
mod hostile;
mod hotswap;
mod http;
mod listeners;
mod loadgen;
mod memory;
mod pipeline;
mod policies;
mod signals;
mod support;
mod timing;
mod tls;
