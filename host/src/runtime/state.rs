//! What a plugin's `Store` holds: its (empty) WASI context, its memory cap, and the
//! state of the call in progress.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::message::Envelope;
use crate::router::Router;
use crate::runtime::call_clock::CallClock;
use crate::runtime::engine::{
    MAX_CORE_INSTANCES_PER_COMPONENT, MAX_MEMORIES_PER_COMPONENT, MAX_TABLES_PER_COMPONENT,
};
use crate::runtime::output::PluginOutput;

/// Tables larger than this are refused: no honest plugin needs more entries.
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// Who the plugin is, shared by all its instances.
#[derive(Debug)]
pub struct PluginInfo {
    /// The processor's name: every log line of the plugin carries it.
    pub name: Arc<str>,
    /// The processor's `[processor.config]`.
    pub config: std::collections::BTreeMap<String, String>,
    /// The processor's `max_send_bytes`: what the sends of one call may store in total.
    pub max_send_bytes: u64,
    /// The processor's `send_topics`: where it may send; `None` is anywhere.
    pub send_topics: Option<Vec<String>>,
}

/// Enforces `memory_limit` on the sum of all the memories of a store, not on each one,
/// so a component made of many core instances cannot multiply its share; and remembers
/// that it did, so the failure is reported as "memory" rather than as whatever trap the
/// guest's allocator turns it into.
pub struct MemoryLimiter {
    pub limit: u64,
    pub exceeded: bool,
    /// Bytes of linear memory the store holds: every memory's growth, from zero.
    used: u64,
}

impl MemoryLimiter {
    pub fn new(limit: u64) -> MemoryLimiter {
        MemoryLimiter {
            limit,
            exceeded: false,
            used: 0,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A new memory grows from 0 to its initial size, so `used` counts every memory.
        let growth = desired.saturating_sub(current) as u64;
        let used = self.used.saturating_add(growth);
        if used > self.limit {
            self.exceeded = true;
            return Ok(false);
        }
        self.used = used;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES_PER_COMPONENT as usize
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES_PER_COMPONENT as usize
    }

    fn tables(&self) -> usize {
        MAX_TABLES_PER_COMPONENT as usize
    }
}

/// The message being processed and what the plugin did with it so far.
pub struct CallState {
    /// Routes the plugin's sends; taken per call so a config change applies at once.
    pub router: Arc<Router>,
    /// Sends held back until the message is acknowledged.
    pub sends: Vec<Envelope>,
    /// [`Envelope::stored_bytes`] of `sends`, checked against `max_send_bytes`.
    pub send_bytes: u64,
    /// The call's budget: the epoch callback traps once it is used up.
    pub clock: Arc<CallClock>,
    /// Set by the epoch callback when it trapped for the budget, so the trap is
    /// reported as a timeout.
    pub timed_out: bool,
}

pub struct PluginState {
    pub plugin: Arc<PluginInfo>,
    pub limiter: MemoryLimiter,
    pub call: CallState,
    /// Shared with the stdout/stderr streams: which message their lines belong to.
    pub output: Arc<Mutex<PluginOutput>>,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl PluginState {
    pub fn new(
        plugin: Arc<PluginInfo>,
        memory_limit: u64,
        router: Arc<Router>,
        output: Arc<Mutex<PluginOutput>>,
        wasi: WasiCtx,
    ) -> PluginState {
        PluginState {
            plugin,
            limiter: MemoryLimiter::new(memory_limit),
            call: CallState {
                router,
                sends: Vec::new(),
                send_bytes: 0,
                clock: CallClock::new(Duration::ZERO),
                timed_out: false,
            },
            output,
            wasi,
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
