use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    collector::cli::run(collector::cli::Cli::parse())
}
