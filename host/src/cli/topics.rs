//! `wasmq topics`.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::App;
use crate::escape::escape_controls;
use crate::runtime::registry::Slot;

pub async fn run(config: &Path) -> anyhow::Result<ExitCode> {
    let app = App::load(config).await?;
    println!(
        "{:<32} {:<20} {:<16} {:<28} HASH",
        "TOPIC", "PROCESSOR", "QUEUE", "PLUGIN"
    );
    for (topic, routes) in app.registry.router.routes() {
        for route in routes {
            let (plugin, hash) = match app.registry.processors.get(&route.processor) {
                Some(Slot::Ready(p)) => (p.path.display().to_string(), p.hash[..12].to_string()),
                Some(Slot::Broken { config, .. }) => {
                    (config.plugin.display().to_string(), "BROKEN".to_string())
                }
                None => continue,
            };
            println!(
                "{:<32} {:<20} {:<16} {:<28} {}",
                // A plugin chooses its topic names (subscribed-topics).
                escape_controls(topic),
                route.processor,
                route.queue,
                plugin,
                hash
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
