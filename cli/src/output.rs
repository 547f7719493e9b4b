//! Writing to stdout without panicking when the reader goes away.
//!
//! `println!` panics on a closed pipe (Rust ignores SIGPIPE), which would turn
//! `cbus monitor | head -3` into a stack trace. Every command writes through [`print`], which
//! turns a closed pipe into [`Failure::Closed`]: the command stops and cbus exits quietly.

use std::io::Write;

use crate::error::Failure;

/// Writes `text` to stdout and flushes (monitor lines must not sit in a buffer).
pub fn print(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => Failure::Closed,
            _ => Failure::Connection(format!("cannot write to stdout: {e}")),
        })
}

/// Writes `text` and a newline.
pub fn line(text: &str) -> Result<(), Failure> {
    print(&format!("{text}\n"))
}
