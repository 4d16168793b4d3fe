//! The demo's output: lines of the story, and progress that stays on one line on a terminal
//! (redrawn with `\r`) but comes as plain periodic lines when stdout is a pipe or a file (CI
//! has no terminal).

use std::io::{IsTerminal, Write};

/// Progress bars this wide, in characters.
const BAR_WIDTH: usize = 24;
/// Without a terminal, a progress line every this many percent.
const PLAIN_STEP_PERCENT: u64 = 20;

/// Where the story is printed.
#[derive(Debug)]
pub(crate) struct Screen {
    tty: bool,
    /// A progress line is drawn and not yet ended (terminal only).
    bar_open: bool,
    /// Without a terminal: the label of the current progress and the next percentage to print.
    plain: Option<(String, u64)>,
}

impl Screen {
    pub(crate) fn new() -> Screen {
        Screen {
            tty: std::io::stdout().is_terminal(),
            bar_open: false,
            plain: None,
        }
    }

    /// One line of the story. A progress line being drawn is wiped first and comes back below
    /// at its next update, so that it stays the last line.
    pub(crate) fn say(&mut self, text: impl std::fmt::Display) {
        if self.bar_open {
            print!("\r\x1b[K");
            self.bar_open = false;
        }
        println!("{text}");
    }

    /// Progress of `label`: `done` of `total` bytes, with a note (what is being done).
    pub(crate) fn progress(&mut self, label: &str, done: u64, total: u64, note: &str) {
        let percent = (done.saturating_mul(100)).checked_div(total).unwrap_or(100);
        if self.tty {
            let filled = (percent as usize * BAR_WIDTH / 100).min(BAR_WIDTH);
            print!(
                "\r\x1b[K  {label:<8} [{}{}] {percent:>3}%  {} of {}  {note}",
                "#".repeat(filled),
                "-".repeat(BAR_WIDTH - filled),
                mib(done),
                mib(total)
            );
            let _ = std::io::stdout().flush();
            self.bar_open = true;
            return;
        }
        let next = match &self.plain {
            Some((current, next)) if current == label => *next,
            _ => 0,
        };
        if percent >= next {
            println!(
                "  {label:<8} {percent:>3}%  {} of {}  {note}",
                mib(done),
                mib(total)
            );
            let next = (percent / PLAIN_STEP_PERCENT + 1) * PLAIN_STEP_PERCENT;
            self.plain = Some((label.to_string(), next));
        }
    }

    /// Ends the progress line (the next progress starts afresh).
    pub(crate) fn end_progress(&mut self) {
        if self.bar_open {
            println!();
            self.bar_open = false;
        }
    }

    /// Forgets the plain-output step, so the next progress of the same label prints from 0%.
    pub(crate) fn reset_progress(&mut self) {
        self.end_progress();
        self.plain = None;
    }
}

/// Bytes in MiB with one decimal: "25.0 MiB".
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// A duration in milliseconds or seconds, whichever reads better: "640 ms", "1.6 s".
pub(crate) fn duration(d: std::time::Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(mib(25 << 20), "25.0 MiB");
        assert_eq!(mib(3 << 19), "1.5 MiB");
        assert_eq!(duration(Duration::from_millis(640)), "640 ms");
        assert_eq!(duration(Duration::from_millis(1612)), "1.6 s");
    }
}
