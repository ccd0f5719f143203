//! `producer.send`: routes the message now (so an unroutable topic is an answer the
//! plugin sees at once) and holds it until the current message is acknowledged.

use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};

use crate::message::{Envelope, SendOptions, topic_matches};
use crate::router::RouteError;
use crate::runtime::bindings::producer::{self, Host};
use crate::runtime::bindings::types;
use crate::runtime::state::PluginState;

/// Sends per processed message at most: a runaway loop fails fast instead of
/// growing the settlement transaction without bound.
pub const MAX_SENDS_PER_MESSAGE: usize = 10_000;

/// The header the host stamps on every plugin send: the sending processor's name.
pub const SENDER_HEADER: &str = "x-wasmq-sender";

/// Largest body a plugin may send.
pub const MAX_SEND_BODY: usize = 16 << 20;

impl Host for PluginState {
    fn send(
        &mut self,
        topic: String,
        body: Vec<u8>,
        options: types::SendOptions,
    ) -> Result<(), types::SendError> {
        if self.call.sends.len() >= MAX_SENDS_PER_MESSAGE {
            return Err(types::SendError::Invalid(format!(
                "more than {MAX_SENDS_PER_MESSAGE} sends while processing one message: split the work into several messages"
            )));
        }
        if body.len() > MAX_SEND_BODY {
            return Err(types::SendError::Invalid(format!(
                "body of {} bytes exceeds the {MAX_SEND_BODY}-byte limit: store large payloads elsewhere and send a reference",
                body.len()
            )));
        }
        if let Some(allowed) = &self.plugin.send_topics
            && !allowed.iter().any(|pattern| topic_matches(pattern, &topic))
        {
            return Err(types::SendError::Invalid(format!(
                "topic {topic:?} is not in send_topics {allowed:?} of processor {:?}: send to one of those, or add it to `send_topics` in its [[processor]] table",
                self.plugin.name
            )));
        }
        // Who sent it is the host's to say: a plugin's own x-wasmq-sender (one it
        // forwards from the message it handles, say) is replaced.
        let mut headers = options.headers;
        headers.retain(|(name, _)| !name.eq_ignore_ascii_case(SENDER_HEADER));
        headers.push((SENDER_HEADER.to_string(), self.plugin.name.to_string()));
        let options = SendOptions {
            priority: options.priority.map(Into::into).unwrap_or_default(),
            delay: Duration::from_millis(options.delay_ms.unwrap_or(0)),
            headers,
        };
        let envelopes = match self.call.router.route(&topic, &body, &options) {
            Ok(envelopes) => envelopes,
            Err(RouteError::Unroutable(e)) => {
                return Err(types::SendError::Unroutable(e.to_string()));
            }
            Err(e) => return Err(types::SendError::Invalid(e.to_string())),
        };
        let bytes: u64 = envelopes.iter().map(Envelope::stored_bytes).sum();
        let total = self.call.send_bytes + bytes;
        if total > self.plugin.max_send_bytes {
            return Err(types::SendError::Invalid(format!(
                "this send would bring what this call sent to {total} bytes (bodies and headers, a copy per subscribed processor), past max_send_bytes = {} of processor {:?}: send less while handling one message, or raise `max_send_bytes` in its [[processor]] table",
                self.plugin.max_send_bytes, self.plugin.name
            )));
        }
        self.call.send_bytes = total;
        self.call.sends.extend(envelopes);
        Ok(())
    }
}

pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    producer::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
}
