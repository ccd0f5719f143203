//! `wasmq dead-letter list|show ID|replay ID|purge`.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use std::io::Write;

use crate::cli::open_transport;
use crate::config::Config;
use crate::escape::escape_controls;
use crate::transport::DeadLetter;

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// One line per dead-lettered message.
    List,
    /// Everything about one message, body included. Control characters in what a
    /// producer or plugin wrote (headers, body, error) are shown escaped (`\n`,
    /// `\x1b`); `--raw` writes the body byte for byte instead.
    Show {
        id: String,
        /// Write only the body, byte for byte, with nothing escaped.
        #[arg(long)]
        raw: bool,
    },
    /// Put the message back in its queue, with its id and a fresh attempt count.
    Replay { id: String },
    /// Delete every dead-lettered message.
    Purge,
}

fn time(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

pub async fn run(config: &Path, command: DeadLetterCommand) -> anyhow::Result<ExitCode> {
    // Dead letters need only the store: no plugin has to load to inspect them.
    let config = Config::load(config)?;
    let transport = open_transport(&config).await?;
    match command {
        DeadLetterCommand::List => {
            println!(
                "{:<36} {:<20} {:<24} {:<8} {:<20} ERROR",
                "ID", "PROCESSOR", "TOPIC", "ATTEMPTS", "DEAD AT"
            );
            for d in transport.dead_letters().await? {
                println!(
                    "{:<36} {:<20} {:<24} {:<8} {:<20} {}",
                    d.id,
                    d.processor,
                    escape_controls(&d.topic),
                    d.attempts,
                    time(d.dead_at_ms),
                    escape_controls(&d.error)
                );
            }
        }
        DeadLetterCommand::Show { id, raw: false } => show(&transport.dead_letter(&id).await?),
        DeadLetterCommand::Show { id, raw: true } => {
            std::io::stdout().write_all(&transport.dead_letter(&id).await?.body)?;
        }
        DeadLetterCommand::Replay { id } => {
            transport.replay_dead_letter(&id).await?;
            println!("replayed {id}");
        }
        DeadLetterCommand::Purge => println!("purged {}", transport.purge_dead_letters().await?),
    }
    Ok(ExitCode::SUCCESS)
}

/// Everything about one dead letter; what a producer or plugin wrote is escaped.
fn show(d: &DeadLetter) {
    println!("id:           {}", escape_controls(&d.id));
    println!("queue:        {}", d.queue);
    println!("processor:    {}", d.processor);
    println!("topic:        {}", escape_controls(&d.topic));
    println!("priority:     {}", d.priority);
    println!("attempts:     {}", d.attempts);
    println!("published at: {}", time(d.published_at_ms));
    println!("dead at:      {}", time(d.dead_at_ms));
    println!("error:        {}", escape_controls(&d.error));
    for (name, value) in &d.headers {
        println!(
            "header:       {}={}",
            escape_controls(name),
            escape_controls(value)
        );
    }
    println!(
        "body:\n{}",
        escape_controls(&String::from_utf8_lossy(&d.body))
    );
}
