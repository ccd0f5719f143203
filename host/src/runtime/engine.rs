//! The one wasmtime `Engine` of a process: pooling allocator, epoch interruption, and
//! the ticker thread that advances epochs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::runtime::RuntimeError;

/// Epoch tick: the granularity of timeouts, and how often a running plugin yields to
/// other tasks on its thread.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Instance slots in the pool, with 16 core instances each so Python plugins fit:
/// bounds plugins alive at once (messages in flight, reused instances kept warm, and
/// `subscribed-topics` calls at start-up).
const POOL_SLOTS: u32 = 1000;

/// What one plugin instance may hold, so one component cannot take every slot of the
/// pool. Sized from real guests, with headroom (BENCHMARKS.md, "Plugin shapes"): a
/// Rust guest (wit-bindgen) has 1 memory, 2 tables and 3 core instances,
/// componentize-py's Python 1, 2 and 14, ComponentizeJS 1, 2 and 4, and a
/// composition of two components 2 memories.
pub const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 64;

/// See [`MAX_CORE_INSTANCES_PER_COMPONENT`].
pub const MAX_MEMORIES_PER_COMPONENT: u32 = 8;

/// See [`MAX_CORE_INSTANCES_PER_COMPONENT`].
pub const MAX_TABLES_PER_COMPONENT: u32 = 16;

/// Bytes of each linear memory kept mapped between instances and reset in place
/// (with PAGEMAP_SCAN, only the pages really touched): a small guest's stack and data
/// fit, so a fresh instance takes no page faults.
const MEMORY_KEEP_RESIDENT: usize = 1 << 20;

/// Same for tables.
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// Builds the engine. `max_memory` sizes every memory slot: the largest
/// `memory_limit` of any processor.
pub fn build(max_memory: u64) -> Result<Engine, RuntimeError> {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(POOL_SLOTS)
        .total_core_instances(POOL_SLOTS * 16)
        .total_memories(POOL_SLOTS * 2)
        .total_tables(POOL_SLOTS * 4)
        .total_stacks(POOL_SLOTS)
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
        .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
        .max_memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
        .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto);
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| RuntimeError::Engine(e.to_string()))
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    pub fn start(engine: &Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.weak();
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("wasmq-epoch".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .expect("spawning the epoch ticker thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
