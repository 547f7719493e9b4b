//! `cbus completions` and `cbus man`: generated from the clap definitions in `args`, so they
//! can never disagree with what the binary accepts.

use std::path::Path;

use clap::CommandFactory;

use crate::args::Cli;
use crate::error::Failure;
use crate::output;

pub fn completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "cbus", &mut buf);
    output::print(&String::from_utf8_lossy(&buf))
}

/// Writes cbus.1 and cbus-COMMAND.1 into `dir`, or cbus.1 to stdout without a directory.
pub fn man(dir: Option<&Path>) -> Result<(), Failure> {
    let cmd = Cli::command();
    let render = |c: clap::Command| -> Result<Vec<u8>, std::io::Error> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).render(&mut buf)?;
        Ok(buf)
    };
    let Some(dir) = dir else {
        let page = render(cmd).map_err(|e| Failure::Usage(e.to_string()))?;
        return output::print(&String::from_utf8_lossy(&page));
    };
    let io = |e: std::io::Error| {
        Failure::Usage(format!("cannot write man pages to {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("cbus.1"), render(cmd.clone()).map_err(io)?).map_err(io)?;
    for sub in cmd.get_subcommands() {
        let name = format!("cbus-{}", sub.get_name());
        // clap (without its `string` feature) wants 'static names; these few strings live as
        // long as the process anyway.
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        let page = sub.clone().name(leaked);
        std::fs::write(dir.join(format!("{name}.1")), render(page).map_err(io)?).map_err(io)?;
    }
    Ok(())
}
