use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    collector::cli::main().await
}
