//! The `clipcap` command line: caption, serve, prepare, train, eval, score, synth.
use clap::Parser;

#[cfg(unix)]
unsafe extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

fn main() {
    let cli = clipcap::cli::Cli::parse();
    // Output piped into `head` should end the command quietly, as for any Unix tool; the
    // server keeps Rust's default (ignore SIGPIPE: a client that left is an error, not death).
    #[cfg(unix)]
    if !matches!(
        cli.command,
        clipcap::cli::Command::Serve(_) | clipcap::cli::Command::BenchHttp(_)
    ) {
        const SIGPIPE: i32 = 13;
        const SIG_DFL: usize = 0;
        // SAFETY: restoring the default disposition of one signal before any thread starts.
        unsafe {
            signal(SIGPIPE, SIG_DFL);
        }
    }
    if let Err(e) = clipcap::cli::run(cli) {
        // One clear line (with its causes), non-zero exit.
        eprintln!("error: {e:#}");
        // `clipcap batch` tells a scheduler whether a rerun can help.
        let code = e
            .downcast_ref::<clipcap::batch::BatchError>()
            .map_or(1, |b| b.exit_code());
        std::process::exit(code);
    }
}
