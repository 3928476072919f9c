//! What ferry prints on stdout. A reader that went away (`ferry list | head -1`) must not turn
//! a finished checkpoint, restore or migration into a panic and a wrong exit code: a closed
//! pipe is ignored (the exit code still tells), any other write error is a warning on stderr.
//! Resetting SIGPIPE to its default would kill ferry on a peer's closed socket as well.

use std::fmt;
use std::io::{ErrorKind, Write};

/// `println!` through [`write_out`]: use this for stdout everywhere in the CLI.
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// Writes to stdout; a closed pipe is not an error of ours.
pub fn write_out(args: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() != ErrorKind::BrokenPipe {
            eprintln!("warning: cannot write to stdout: {e}");
        }
    }
}
