//! `config.get`: the processor's `[processor.config]` values.

use wasmtime::component::{HasSelf, Linker};

use crate::runtime::bindings::config::{self, Host};
use crate::runtime::state::PluginState;

impl Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.plugin.config.get(&key).cloned()
    }
}

pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    config::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
}
