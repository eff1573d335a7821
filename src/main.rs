use clap::Parser;

fn main() -> std::process::ExitCode {
    bus::cli::main(bus::cli::Cli::parse())
}
