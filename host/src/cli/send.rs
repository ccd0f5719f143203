//! `wasmq send TOPIC [BODY]`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;

use crate::cli::open_transport;
use crate::config::Config;
use crate::config::parse_duration;
use crate::message::{Priority, SendOptions};
use crate::router::{Route, Router};
use crate::runtime::Runtime;
use crate::runtime::cache::content_hash;
use crate::runtime::registry::claimed_elsewhere;
use crate::transport::Transport;

#[derive(Debug, Args)]
pub struct SendArgs {
    /// The topic; every processor subscribed to it gets a delivery.
    pub topic: String,
    /// The body. Without it (and without --body-file) the body is read from stdin.
    pub body: Option<String>,
    /// Read the body from this file.
    #[arg(long, conflicts_with = "body")]
    pub body_file: Option<PathBuf>,
    /// very-low, low, normal, high or very-high.
    #[arg(long, default_value = "normal", value_parser = |s: &str| s.parse::<Priority>())]
    pub priority: Priority,
    /// Deliver no earlier than this from now, e.g. 10s or 5m.
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<std::time::Duration>,
    /// A header, as name=value; repeat for more.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!(
            "header {text:?} is not name=value: write it like --header tenant=acme"
        )),
    }
}

pub async fn run(config: &Path, args: SendArgs) -> anyhow::Result<ExitCode> {
    let body = match (&args.body, &args.body_file) {
        (Some(body), _) => body.clone().into_bytes(),
        (None, Some(file)) => {
            std::fs::read(file).with_context(|| format!("reading --body-file {file:?}"))?
        }
        (None, None) => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .context("reading the body from stdin")?;
            body
        }
    };
    if args.topic.trim().is_empty() {
        bail!("the topic is empty: name the topic to send to (`wasmq topics` lists them)");
    }
    let config = Config::load(config)?;
    let transport = open_transport(&config).await?;
    let router = router(&config, transport.as_ref()).await?;
    let options = SendOptions {
        priority: args.priority,
        delay: args.delay.unwrap_or_default(),
        headers: args.headers,
    };
    let envelopes = router.route(&args.topic, &body, &options)?;
    if envelopes.is_empty() {
        eprintln!(
            "no processor subscribes to {:?}; dropped (on_unroutable = \"drop\")",
            args.topic
        );
        return Ok(ExitCode::SUCCESS);
    }
    for id in transport.send(envelopes).await? {
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The routes, without running plugin code where it can: a processor's configured
/// topics, or the topics its plugin build declared when a consumer or `wasmq check`
/// last loaded it. Only a build never loaded before is loaded here, to ask it.
async fn router(config: &Config, transport: &dyn Transport) -> anyhow::Result<Router> {
    let mut router = Router::new(config.producer.on_unroutable);
    let mut runtime = None;
    for p in &config.processors {
        let topics = match &p.topics {
            Some(topics) => topics.clone(),
            None => {
                let path = config.plugin_path(p);
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading plugin {path:?}"))?;
                let hash = content_hash(&bytes);
                match transport.recorded_topics(&p.name, &hash).await? {
                    Some(topics) => topics,
                    None => {
                        tracing::debug!(processor = %p.name,
                            "no consumer or check has loaded this plugin build yet: loading it to ask its topics");
                        let runtime = match &mut runtime {
                            Some(runtime) => runtime,
                            None => runtime.insert(Runtime::for_config(config)?),
                        };
                        match runtime.load(p, &path).await {
                            Ok(loaded) => {
                                transport
                                    .record_topics(&p.name, &hash, &loaded.topics)
                                    .await?;
                                loaded.topics.clone()
                            }
                            // Its topics are unknown: other topics still route. The
                            // failure is recorded as no topics, so the next send does
                            // not wait for this build again (a consumer or `check`
                            // that loads it records its topics).
                            Err(e) => {
                                tracing::error!(error = %e, "plugin cannot be loaded; its topics do not route until a consumer or `wasmq check` loads it");
                                transport.record_topics(&p.name, &hash, &[]).await?;
                                Vec::new()
                            }
                        }
                    }
                }
            }
        };
        let taken = claimed_elsewhere(config, p, &topics);
        for topic in &topics {
            if !taken.iter().any(|t| &t.topic == topic) {
                router.subscribe(topic, Route::to(p));
            }
        }
    }
    Ok(router)
}
