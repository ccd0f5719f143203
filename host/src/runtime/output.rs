//! A plugin's stdout and stderr, written line by line to the log under the plugin's
//! name and the id of the message in progress.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// A line longer than this is logged in pieces, so a plugin cannot make the host buffer
/// without bound.
const MAX_LINE: usize = 8 << 10;

/// Stderr lines quoted in a failure's reason.
const KEPT_STDERR_LINES: usize = 3;

/// Per-instance output state, shared by both streams and the store.
#[derive(Debug, Default)]
pub struct PluginOutput {
    pub plugin: Arc<str>,
    pub message_id: String,
    /// The last few stderr lines of the current call: a panicking Rust guest prints
    /// its message there, and the dead-letter reason quotes them.
    pub last_stderr: Vec<String>,
}

impl PluginOutput {
    pub fn new(plugin: Arc<str>) -> Arc<Mutex<PluginOutput>> {
        Arc::new(Mutex::new(PluginOutput {
            plugin,
            ..PluginOutput::default()
        }))
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Implements WASI's stdout/stderr for one instance.
#[derive(Clone)]
pub struct LogStream {
    stream: Stream,
    shared: Arc<Mutex<PluginOutput>>,
}

impl LogStream {
    pub fn new(stream: Stream, shared: Arc<Mutex<PluginOutput>>) -> LogStream {
        LogStream { stream, shared }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineWriter {
            target: self.clone(),
            pending: Vec::new(),
        })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only the WASIp2 stream is used by `world processor`; this sink keeps the
        // trait whole without a second code path.
        Box::new(tokio::io::sink())
    }
}

struct LineWriter {
    target: LogStream,
    pending: Vec<u8>,
}

impl LineWriter {
    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return;
        }
        let Ok(mut shared) = self.target.shared.lock() else {
            return;
        };
        match self.target.stream {
            Stream::Stdout => {
                tracing::info!(target: "wasmq::plugin", plugin = %shared.plugin, message_id = %shared.message_id, "stdout: {text}")
            }
            Stream::Stderr => {
                tracing::warn!(target: "wasmq::plugin", plugin = %shared.plugin, message_id = %shared.message_id, "stderr: {text}");
                // Rust's hint about RUST_BACKTRACE says nothing about the failure.
                if !text.starts_with("note: run with `RUST_BACKTRACE") {
                    if shared.last_stderr.len() == KEPT_STDERR_LINES {
                        shared.last_stderr.remove(0);
                    }
                    shared.last_stderr.push(text.chars().take(500).collect());
                }
            }
        }
    }

    fn flush_lines(&mut self, all: bool) {
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line[..line.len() - 1]);
        }
        if (all || self.pending.len() >= MAX_LINE) && !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest);
        }
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.flush_lines(true);
    }
}

#[async_trait::async_trait]
impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.pending.extend_from_slice(&bytes);
        self.flush_lines(false);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(MAX_LINE)
    }
}

#[async_trait::async_trait]
impl Pollable for LineWriter {
    async fn ready(&mut self) {}
}
