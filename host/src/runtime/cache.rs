//! Compiled plugins cached on disk, keyed by the plugin's content hash and the
//! engine's compatibility hash, so a restart deserialises instead of recompiling and
//! a wasmtime upgrade or a changed engine setting never loads a stale artifact.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::runtime::RuntimeError;

/// Hex SHA-256 of a plugin file's bytes: its identity in the cache and in `wasmq topics`.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn engine_hash(engine: &Engine) -> u64 {
    // DefaultHasher::new() has fixed keys: the same engine hashes alike in every process.
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.finish()
}

fn cache_file(cache_dir: &Path, engine: &Engine, hash: &str) -> PathBuf {
    cache_dir.join(format!(
        "{}-{:016x}.cwasm",
        &hash[..32],
        engine_hash(engine)
    ))
}

/// Loads the compiled component from the cache, or compiles it and stores it.
pub fn load(
    engine: &Engine,
    cache_dir: &Path,
    plugin: &Path,
    bytes: &[u8],
    hash: &str,
) -> Result<Component, RuntimeError> {
    let cached = cache_file(cache_dir, engine, hash);
    if cached.is_file() {
        // SAFETY: the file is one we serialised for this engine (the name carries the
        // engine's compatibility hash); wasmtime still checks its header and version.
        match unsafe { Component::deserialize_file(engine, &cached) } {
            Ok(component) => return Ok(component),
            Err(e) => {
                tracing::warn!(cache = ?cached, error = %e, "ignoring unreadable compiled plugin; recompiling")
            }
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| RuntimeError::Compile {
        plugin: plugin.to_path_buf(),
        reason: format!("{e:#}"),
    })?;
    if let Err(e) = store(&component, cache_dir, &cached) {
        tracing::warn!(cache = ?cached, error = %e, "cannot cache the compiled plugin; it will be compiled again next start");
    }
    Ok(component)
}

fn store(component: &Component, cache_dir: &Path, target: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(cache_dir)?;
    let bytes = component
        .serialize()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // Write then rename, so a concurrent reader never sees half a file.
    let partial = target.with_extension(format!("{}.partial", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, target)
}
