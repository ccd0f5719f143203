//! A plugin's stdout and stderr, written line by line to the log under the plugin's
//! name and the id of the message in progress, and the per-call cap
//! (`max_output_bytes`) on all the text a plugin puts into the log.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

use crate::escape::escape_controls;

/// A line longer than this is logged in pieces, so a plugin cannot make the host buffer
/// without bound.
const MAX_LINE: usize = 8 << 10;

/// Stderr lines quoted in a failure's reason.
const KEPT_STDERR_LINES: usize = 3;

/// Characters of each of those lines kept: the reason is one line of a dead letter.
const KEPT_STDERR_CHARS: usize = 500;

#[derive(Clone, Copy, Debug)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Per-instance output state, shared by both streams and the store.
#[derive(Debug)]
pub struct PluginOutput {
    pub plugin: Arc<str>,
    pub message_id: String,
    /// The last few stderr lines of the current call: a panicking Rust guest prints
    /// its message there, and the dead-letter reason quotes them. Kept even past the
    /// output cap, since the panic comes last.
    last_stderr: VecDeque<String>,
    /// `max_output_bytes`: the log text (stdout, stderr, `log.log`) one call may write.
    limit: u64,
    /// Log text the current call wrote so far.
    written: u64,
    /// Log text the current call wrote past `limit`, dropped.
    dropped: u64,
    /// A partial line per stream (stdout, stderr), waiting for its newline.
    pending: [Vec<u8>; 2],
}

impl PluginOutput {
    pub fn new(plugin: Arc<str>, max_output_bytes: u64) -> Arc<Mutex<PluginOutput>> {
        Arc::new(Mutex::new(PluginOutput {
            plugin,
            message_id: String::new(),
            last_stderr: VecDeque::with_capacity(KEPT_STDERR_LINES),
            limit: max_output_bytes,
            written: 0,
            dropped: 0,
            pending: [Vec::new(), Vec::new()],
        }))
    }

    /// Starts a call: its lines carry `message_id`, and it gets the whole budget.
    pub fn begin_call(&mut self, message_id: &str) {
        self.message_id.clear();
        self.message_id.push_str(message_id);
        self.last_stderr.clear();
        self.written = 0;
        self.dropped = 0;
    }

    /// Ends a call: logs its partial lines, then one warning if output was dropped.
    /// Returns the bytes dropped. Output written after it (a start function of the
    /// next instance, say) counts on with what is left of the budget.
    pub fn finish_call(&mut self) -> u64 {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let rest = std::mem::take(&mut self.pending[stream as usize]);
            if !rest.is_empty() {
                self.emit(stream, &rest);
            }
        }
        if self.dropped > 0 {
            tracing::warn!(plugin = %self.plugin, message_id = %self.message_id,
                dropped_bytes = self.dropped, max_output_bytes = self.limit,
                "plugin output past max_output_bytes: dropped the rest of this call's stdout, stderr and log.log text; raise `max_output_bytes` in its [[processor]] table to keep more");
        }
        std::mem::take(&mut self.dropped)
    }

    /// Takes `bytes` of log text from the call's budget. False (and counted as
    /// dropped) once the budget is spent: from then on the call's output is dropped
    /// whole, so the log never shows a later line without the ones before it.
    pub fn admit(&mut self, bytes: usize) -> bool {
        let bytes = bytes as u64;
        if self.dropped > 0 || self.written + bytes > self.limit {
            self.dropped += bytes;
            return false;
        }
        self.written += bytes;
        true
    }

    /// The last stderr lines of the call, for a failure's reason.
    pub fn last_stderr(&self) -> String {
        let lines: Vec<&str> = self.last_stderr.iter().map(String::as_str).collect();
        lines.join(" / ")
    }

    fn write(&mut self, stream: Stream, bytes: &[u8]) {
        let pending = &mut self.pending[stream as usize];
        pending.extend_from_slice(bytes);
        let mut lines = std::mem::take(pending);
        let mut start = 0;
        while let Some(end) = lines[start..].iter().position(|&b| b == b'\n') {
            self.emit(stream, &lines[start..start + end]);
            start += end + 1;
        }
        if lines.len() - start >= MAX_LINE {
            self.emit(stream, &lines[start..]);
            start = lines.len();
        }
        lines.drain(..start);
        self.pending[stream as usize] = lines;
    }

    fn emit(&mut self, stream: Stream, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return;
        }
        // A CR or ESC inside the line must not rewrite the log or the reason.
        let text = escape_controls(text);
        // Only what the log shows counts against the budget (stdout is INFO: hidden
        // without -v). The newline counts: it is a byte the plugin wrote.
        match stream {
            Stream::Stdout => {
                if tracing::enabled!(target: "wasmq::plugin", tracing::Level::INFO)
                    && self.admit(line.len() + 1)
                {
                    tracing::info!(target: "wasmq::plugin", plugin = %self.plugin, message_id = %self.message_id, "stdout: {text}")
                }
            }
            Stream::Stderr => {
                if tracing::enabled!(target: "wasmq::plugin", tracing::Level::WARN)
                    && self.admit(line.len() + 1)
                {
                    tracing::warn!(target: "wasmq::plugin", plugin = %self.plugin, message_id = %self.message_id, "stderr: {text}");
                }
                // Rust's hint about RUST_BACKTRACE says nothing about the failure.
                if !text.starts_with("note: run with `RUST_BACKTRACE") {
                    let mut kept = if self.last_stderr.len() == KEPT_STDERR_LINES {
                        self.last_stderr.pop_front().unwrap_or_default()
                    } else {
                        String::new()
                    };
                    kept.clear();
                    kept.extend(text.chars().take(KEPT_STDERR_CHARS));
                    self.last_stderr.push_back(kept);
                }
            }
        }
    }
}

/// Calls that end without [`PluginOutput::finish_call`] (`subscribed-topics` at
/// start-up, `wasmq check`) still get their partial lines and warning when the
/// instance goes.
impl Drop for PluginOutput {
    fn drop(&mut self) {
        self.finish_call();
    }
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
        })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only the WASIp2 stream is used by `world processor`; this sink keeps the
        // trait whole without a second code path.
        Box::new(tokio::io::sink())
    }
}

/// One WASI stream handle. Partial lines wait in the shared [`PluginOutput`], so
/// every handle to a stream appends to the same line, and the call's end logs them.
struct LineWriter {
    target: LogStream,
}

#[async_trait::async_trait]
impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        if let Ok(mut shared) = self.target.shared.lock() {
            shared.write(self.target.stream, &bytes);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_cap_is_dropped_whole_and_counted() {
        let shared = PluginOutput::new("p".into(), 20);
        let mut output = shared.lock().unwrap();
        output.begin_call("m1");
        assert!(output.admit(10));
        assert!(output.admit(10));
        assert!(!output.admit(1), "the budget is spent");
        assert!(!output.admit(0), "nothing is admitted after a drop");
        assert_eq!(output.finish_call(), 1);
        assert_eq!(output.finish_call(), 0, "the drop is reported once");

        output.begin_call("m2");
        assert!(output.admit(20), "each call gets the whole budget");
        assert_eq!(output.finish_call(), 0);
    }

    #[test]
    fn the_last_stderr_lines_are_kept_past_the_cap() {
        let shared = PluginOutput::new("p".into(), 0);
        let mut output = shared.lock().unwrap();
        output.begin_call("m");
        output.write(Stream::Stderr, b"one\ntwo\nthree\nfour\npanicked at");
        assert_eq!(output.last_stderr(), "two / three / four");
        assert_eq!(output.finish_call(), 0, "no subscriber: nothing is shown");
        assert_eq!(output.last_stderr(), "three / four / panicked at");
    }

    #[test]
    fn long_lines_are_cut_and_partial_lines_wait_for_their_newline() {
        let shared = PluginOutput::new("p".into(), u64::MAX);
        let mut output = shared.lock().unwrap();
        output.begin_call("m");
        output.write(Stream::Stderr, b"par");
        output.write(Stream::Stderr, b"tial");
        assert_eq!(output.last_stderr(), "");
        output.write(Stream::Stderr, b"\n");
        assert_eq!(output.last_stderr(), "partial");
        output.write(Stream::Stdout, &vec![b'x'; MAX_LINE + 1]);
        assert!(output.pending[Stream::Stdout as usize].is_empty());
    }
}
