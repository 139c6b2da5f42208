//! `completions` and `man`: shell completion scripts and the manual page,
//! generated from the clap definitions in this module's parent, so they
//! never drift from the real arguments.

use super::Cli;
use anyhow::Context;
use clap::CommandFactory;
use std::io::Write;

/// Writes the completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "authswap", &mut out);
    write_stdout(&out)
}

/// Writes the manual page (roff, section 1) on stdout.
pub fn man() -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .context("cannot render the manual page")?;
    write_stdout(&out)
}

/// Writes `bytes` on stdout; a reader that stops early (`| head`) is not
/// an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}
