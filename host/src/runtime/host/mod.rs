//! The host side of each WIT import a plugin may use, one file per interface.

mod config;
mod log;
mod producer;

use wasmtime::component::{HasSelf, Linker};

use crate::runtime::RuntimeError;
use crate::runtime::bindings::types;
use crate::runtime::state::PluginState;

impl types::Host for PluginState {}

/// Adds WASI (with an empty context: no capabilities) and wasmq's imports.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> Result<(), RuntimeError> {
    let link = |e: wasmtime::Error| RuntimeError::Engine(format!("linking host imports: {e}"));
    wasmtime_wasi::p2::add_to_linker_async(linker).map_err(link)?;
    types::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s).map_err(link)?;
    producer::add_to_linker(linker).map_err(link)?;
    log::add_to_linker(linker).map_err(link)?;
    config::add_to_linker(linker).map_err(link)?;
    Ok(())
}
