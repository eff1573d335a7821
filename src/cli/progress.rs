//! Progress bars for the long-running tools, drawn on standard error only when a person is
//! watching it (a terminal); piped or redirected runs stay quiet.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Counts events; with a total, a bar.
pub fn events(total: Option<u64>, message: &str) -> ProgressBar {
    bar(
        total,
        message,
        "{msg} [{bar:30}] {human_pos}/{human_len} events ({per_sec}, {eta})",
        "{spinner} {msg}: {human_pos} events ({per_sec})",
    )
}

/// Counts bytes, against a total.
pub fn bytes(total: u64, message: &str) -> ProgressBar {
    bar(
        Some(total),
        message,
        "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        "{spinner} {msg}: {bytes}",
    )
}

fn bar(total: Option<u64>, message: &str, with_total: &str, without: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(total) => (ProgressBar::new(total), with_total),
        None => (ProgressBar::new_spinner(), without),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_owned());
    bar
}
