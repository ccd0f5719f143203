//! `log.log`: a plugin's own log lines, tagged with its name and the message id, and
//! counted with its stdout and stderr against `max_output_bytes`.

use wasmtime::component::{HasSelf, Linker};

use crate::escape::escape_controls;
use crate::runtime::bindings::log::{self, Host};
use crate::runtime::bindings::types::Level;
use crate::runtime::state::PluginState;

/// Longest line kept; longer ones are cut so a plugin cannot flood the log.
const MAX_LOG_LINE: usize = 16 << 10;

impl Host for PluginState {
    fn log(&mut self, level: Level, text: String) {
        let mut text = text;
        if text.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        let shown = match level {
            Level::Trace => tracing::enabled!(target: "wasmq::plugin", tracing::Level::TRACE),
            Level::Debug => tracing::enabled!(target: "wasmq::plugin", tracing::Level::DEBUG),
            Level::Info => tracing::enabled!(target: "wasmq::plugin", tracing::Level::INFO),
            Level::Warn => tracing::enabled!(target: "wasmq::plugin", tracing::Level::WARN),
            Level::Error => tracing::enabled!(target: "wasmq::plugin", tracing::Level::ERROR),
        };
        // Text the log would not show does not count against max_output_bytes.
        if !shown {
            return;
        }
        let Ok(mut output) = self.output.lock() else {
            return;
        };
        if !output.admit(text.len()) {
            return;
        }
        let message_id = output.message_id.clone();
        drop(output);
        // A newline in the text would forge a log line of its own.
        let text = escape_controls(&text);
        let plugin = &*self.plugin.name;
        match level {
            Level::Trace => {
                tracing::trace!(target: "wasmq::plugin", plugin = %plugin, message_id = %message_id, "{text}")
            }
            Level::Debug => {
                tracing::debug!(target: "wasmq::plugin", plugin = %plugin, message_id = %message_id, "{text}")
            }
            Level::Info => {
                tracing::info!(target: "wasmq::plugin", plugin = %plugin, message_id = %message_id, "{text}")
            }
            Level::Warn => {
                tracing::warn!(target: "wasmq::plugin", plugin = %plugin, message_id = %message_id, "{text}")
            }
            Level::Error => {
                tracing::error!(target: "wasmq::plugin", plugin = %plugin, message_id = %message_id, "{text}")
            }
        }
    }
}

pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    log::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
}
