//! Progress bars for the long-running commands and examples.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps on stderr, labelled `label`, showing the position, elapsed and
/// remaining time and the current message.
pub fn progress_bar(len: u64, label: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix} {bar:30} {pos}/{len} [{elapsed} elapsed, {eta} left] {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(len)
        .with_style(style)
        .with_prefix(label.to_string())
}
