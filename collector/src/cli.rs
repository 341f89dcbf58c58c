//! Command-line interface of `keywatch`.

use clap::{Parser, Subcommand};

/// Keywatch: which process, on which host, just used which credential — and was it supposed to?
#[derive(Debug, Parser)]
#[command(name = "keywatch", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the gRPC schema version this collector speaks.
    Version,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Version => {
            println!("keywatch {} (keywatch.v1)", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
