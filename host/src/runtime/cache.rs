//! Compiled plugins cached on disk, keyed by the plugin's content hash and the
//! engine's compatibility hash, so a restart deserialises instead of recompiling and
//! a wasmtime upgrade or a changed engine setting never loads a stale artifact.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
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
///
/// A compiled artifact is native code that runs outside the sandbox, so the cache is
/// trusted only as far as no one else could have written it: its folder and file must
/// belong to this process's user and be writable by no one else, and a symlink is
/// never followed. Anything else is refused with a WARN naming it, and the plugin is
/// compiled afresh.
pub fn load(
    engine: &Engine,
    cache_dir: &Path,
    plugin: &Path,
    bytes: &[u8],
    hash: &str,
) -> Result<Component, RuntimeError> {
    let cached = cache_file(cache_dir, engine, hash);
    match read_trusted(cache_dir, &cached) {
        // SAFETY: the file is one this user's wasmq serialised for this engine (the
        // name carries the engine's compatibility hash), in a folder no one else can
        // write; wasmtime still checks its header and version.
        Ok(Some(artifact)) => match unsafe { Component::deserialize(engine, &artifact) } {
            Ok(component) => return Ok(component),
            Err(e) => {
                tracing::warn!(cache = ?cached, error = %e, "ignoring unreadable compiled plugin; recompiling")
            }
        },
        Ok(None) => {}
        Err(why) => tracing::warn!(cache = ?cached, reason = %why,
            "not trusting this compiled plugin: recompiling (the cache folder must be this user's, mode 700, its files 600)"),
    }
    let component = Component::new(engine, bytes).map_err(|e| {
        let plugin = plugin.to_path_buf();
        let reason = format!("{e:#}");
        // wasmtime checks the pool's per-component limits as it compiles.
        if reason.contains("in the pooling allocator") {
            RuntimeError::OverInstanceLimits { plugin, reason }
        } else {
            RuntimeError::Compile { plugin, reason }
        }
    })?;
    if let Err(e) = store(&component, cache_dir, &cached) {
        tracing::warn!(cache = ?cached, error = %e, "cannot cache the compiled plugin; it will be compiled again next start");
    }
    Ok(component)
}

/// Whether the owner and mode of the cache folder, or of a file in it, let this
/// process trust it: its own user's, and writable by no one else.
fn trusted(what: &str, meta: &std::fs::Metadata) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "the {what} belongs to uid {}, not to this user ({me})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "the {what} is writable by its group or by others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The artifact's bytes, `None` when there is none yet, or why it is not trusted.
fn read_trusted(cache_dir: &Path, cached: &Path) -> Result<Option<Vec<u8>>, String> {
    match std::fs::symlink_metadata(cache_dir) {
        Ok(meta) if meta.is_dir() => trusted("cache folder", &meta)?,
        Ok(_) => return Err("the cache folder is not a folder (a symlink?)".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read the cache folder: {e}")),
    }
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(cached)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it without following links: {e}")),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    trusted("file", &meta)?;
    let mut artifact = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut artifact).map_err(|e| e.to_string())?;
    Ok(Some(artifact))
}

/// Writes the artifact through a temp file of a random name, created exclusively
/// and private, then renamed over the target: a concurrent reader never sees half a
/// file, two processes never write the same temp file, and a planted symlink is
/// replaced, not followed.
fn store(component: &Component, cache_dir: &Path, target: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache_dir)?;
    let meta = std::fs::symlink_metadata(cache_dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("the cache folder is not a folder"));
    }
    trusted("cache folder", &meta).map_err(std::io::Error::other)?;
    let bytes = component
        .serialize()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let partial = cache_dir.join(format!(".{}.partial", uuid::Uuid::new_v4()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&partial)?;
    let written = file
        .write_all(&bytes)
        .and_then(|()| std::fs::rename(&partial, target));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}
