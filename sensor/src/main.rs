fn main() -> std::process::ExitCode {
    sensor::cli::main()
}
