//! What a command line of this workspace does around its work: a bad flag prints clap's error
//! on one line and exits 2 (`--help` and `--version` print in full), a failure prints `error: …` with
//! its causes on one line and exits 1.

use std::process::ExitCode;

/// Parses `A` from the command line; a bad flag is printed as one line, and its exit code
/// returned.
pub fn parse<A: clap::Parser>() -> Result<A, ExitCode> {
    match A::try_parse() {
        Ok(args) => Ok(args),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // Clap's first paragraph on one line: the error and what it names (a missing
            // flag is listed on the lines after "not provided:"); usage and tips left out.
            let text = e.to_string();
            let lines: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!(
                "{}",
                if lines.is_empty() {
                    "invalid arguments".into()
                } else {
                    lines.join(" ")
                }
            );
            Err(ExitCode::from(2))
        }
    }
}

/// Parses `A` from the command line and runs `run` on it.
pub fn main<A: clap::Parser>(run: impl FnOnce(A) -> anyhow::Result<()>) -> ExitCode {
    let args = match parse::<A>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
