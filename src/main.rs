//! The `clipcap` command line: caption, serve, prepare, train, eval, score, synth.
use clap::Parser;

fn main() {
    let cli = clipcap::cli::Cli::parse();
    if let Err(e) = clipcap::cli::run(cli) {
        // One clear line (with its causes), non-zero exit.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
