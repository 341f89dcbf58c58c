//! `keywatch` (the collector and its CLI) built inside this crate, so the journeys can run it
//! as a separate process by the path cargo gives them.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    collector::cli::main().await
}
