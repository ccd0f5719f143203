//! wasmq: a message-queue consumer whose processors are sandboxed WebAssembly
//! components.
//!
//! - [`config`]: `wasmq.toml`, typed and validated.
//! - [`escape`]: plugin and producer text made safe for logs and terminals.
//! - [`message`]: messages, priorities, statuses, send options, envelopes.
//! - [`router`]: topic → the processors subscribed to it.
//! - [`transport`]: the store boundary; [`transport::dbal::sqlite`] is the embedded default.
//! - [`runtime`]: the wasmtime engine, plugins, the host side of the WIT imports.
//! - [`consumer`]: claim → process → settle, concurrency, limits, graceful stop.
//! - [`cli`]: the `wasmq` command line.

pub mod cli;
pub mod config;
pub mod consumer;
pub mod escape;
pub mod message;
pub mod router;
pub mod runtime;
pub mod transport;
