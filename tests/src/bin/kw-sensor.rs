//! `keywatch-sensor` itself, built inside this crate so its tests can run it as a separate
//! process (cargo gives integration tests the paths of their own crate's binaries only).

fn main() -> std::process::ExitCode {
    sensor::cli::main()
}
