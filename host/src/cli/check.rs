//! `wasmq check`: every problem with the config and the plugins, at once.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::open_transport;
use crate::config::Config;
use crate::escape::escape_controls;
use crate::runtime::registry::claimed_elsewhere;
use crate::runtime::{Runtime, RuntimeError};

pub async fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let runtime = Runtime::for_config(&config)?;
    let mut problems = Vec::new();
    let transport = match open_transport(&config).await {
        Ok(transport) => {
            match transport.describe().await {
                Ok(store) => println!("ok: message store: {store}"),
                Err(e) => problems.push(format!("{e:#}")),
            }
            Some(transport)
        }
        Err(e) => {
            problems.push(format!("{e:#}"));
            None
        }
    };
    let mut topics = 0;
    for p in &config.processors {
        match runtime.load(p, &config.plugin_path(p)).await {
            Ok(loaded) => match loaded.probe().await {
                Ok(()) => {
                    for taken in claimed_elsewhere(&config, p, &loaded.topics) {
                        problems.push(RuntimeError::from(taken).to_string());
                    }
                    topics += loaded.topics.len();
                    // What the plugin declared, for `wasmq send` to route by.
                    if let Some(transport) = &transport
                        && p.topics.is_none()
                        && let Err(e) = transport
                            .record_topics(&p.name, &loaded.hash, &loaded.topics)
                            .await
                    {
                        problems.push(format!(
                            "recording the topics of processor {:?}: {e}",
                            p.name
                        ));
                    }
                    println!(
                        "ok: processor {:?} ({}) handles {}",
                        p.name,
                        loaded.path.display(),
                        // A plugin chooses its topic names (subscribed-topics).
                        escape_controls(&loaded.topics.join(", "))
                    );
                }
                Err(e) => problems.push(e.to_string()),
            },
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        println!(
            "ok: {} processor(s), {topics} topic subscription(s)",
            config.processors.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        for problem in &problems {
            eprintln!("error: {}", escape_controls(problem));
        }
        Ok(ExitCode::FAILURE)
    }
}
