//! `tokend completions SHELL` and `tokend man`: the shell completions and
//! the man page, made from the same definitions as the parser
//! (src/cli/args.rs), so they cannot drift from it. Both commands are
//! hidden; README "Install on a server" runs them.

use std::io::{self, Write};

use clap::CommandFactory;
use clap_mangen::Man;

use super::Exit;
use super::args::Cli;

pub fn completions(shell: clap_complete::Shell) -> Result<(), Exit> {
    write(&completion_script(shell))
}

pub fn man() -> Result<(), Exit> {
    let page = man_page().map_err(|e| Exit::failure(format!("cannot render the man page: {e}")))?;
    write(&page)
}

/// The completion script for `shell`.
pub fn completion_script(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tokend", &mut out);
    out
}

/// One page, tokend(1), for every command: the global part as clap_mangen
/// renders it, then a COMMANDS section with each visible command's synopsis,
/// description and options (clap_mangen alone would point at a page per
/// command, tokend-run(1) and so on, which are not installed).
pub fn man_page() -> io::Result<Vec<u8>> {
    let cli = Cli::command();
    let top = Man::new(cli.clone());
    let mut page = Vec::new();
    top.render_title(&mut page)?;
    top.render_name_section(&mut page)?;
    top.render_synopsis_section(&mut page)?;
    top.render_description_section(&mut page)?;
    top.render_options_section(&mut page)?;
    page.extend_from_slice(b".SH COMMANDS\n");
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("tokend {}", sub.get_name());
        // Its own options only: -c is the global one above; no -h each time.
        let man = Man::new(sub.clone().bin_name(&name).disable_help_flag(true));
        page.extend_from_slice(format!(".SS \"{name}\"\n").as_bytes());
        let mut part = Vec::new();
        man.render_synopsis_section(&mut part)?;
        man.render_description_section(&mut part)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut part)?;
        }
        // Its sections become paragraphs under the command's heading.
        for line in String::from_utf8_lossy(&part).lines() {
            match line {
                ".SH OPTIONS" => page.extend_from_slice(b".PP\nOptions:\n"),
                _ if line.starts_with(".SH ") => page.extend_from_slice(b".PP\n"),
                _ => {
                    page.extend_from_slice(line.as_bytes());
                    page.push(b'\n');
                }
            }
        }
    }
    let mut notes = Vec::new();
    top.render_extra_section(&mut notes)?;
    let notes = String::from_utf8_lossy(&notes).replace(".SH EXTRA", ".SH NOTES");
    page.extend_from_slice(notes.as_bytes());
    top.render_version_section(&mut page)?;
    // Each render begins with the same two lines (they define the Aq
    // string); once, at the top, is enough.
    let text = String::from_utf8_lossy(&page);
    let mut seen = Vec::new();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with(r".ie \n(.g .ds Aq") || line.starts_with(".el .ds Aq") {
            if seen.contains(&line) {
                continue;
            }
            seen.push(line);
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok(out.into_bytes())
}

/// Writes `out` to stdout; a closed pipe is not worth a message.
fn write(out: &[u8]) -> Result<(), Exit> {
    match io::stdout().lock().write_all(out) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(Exit::failure(format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}
