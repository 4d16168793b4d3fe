//! The log sink: sentences with key=value context, prefixed with the node and its role, written
//! to stderr and kept in a bounded ring of recent events (the `events` command) with their
//! wall-clock time. Lines for the serial console are queued for the runtime, which prints them
//! without ever blocking.

use crate::constants::{CONSOLE_LOG_QUEUE_COUNT_MAX, EVENTS_COUNT_MAX};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

/// One remembered log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// "error", "warning" or "info".
    pub level: &'static str,
    /// The sentence, without the prefix.
    pub text: String,
}

struct State {
    prefix: String,
    events: VecDeque<Event>,
    console: VecDeque<String>,
    console_dropped: u64,
}

struct Logger {
    state: Mutex<State>,
}

static LOGGER: Logger = Logger {
    state: Mutex::new(State {
        prefix: String::new(),
        events: VecDeque::new(),
        console: VecDeque::new(),
        console_dropped: 0,
    }),
};

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => "error",
            log::Level::Warn => "warning",
            _ => "info",
        };
        let text = record.args().to_string();
        // A poisoned lock means a panic elsewhere, which aborts the process anyway.
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let shown_level = if level == "info" {
            String::new()
        } else {
            format!("{level}: ")
        };
        let line = format!("[{}] {shown_level}{text}", state.prefix);
        // A failed write to stderr has nowhere better to be reported.
        let _ = writeln!(std::io::stderr().lock(), "{line}");
        if record.level() <= log::Level::Info {
            if state.events.len() == EVENTS_COUNT_MAX {
                state.events.pop_front();
            }
            state.events.push_back(Event {
                unix_ms: unix_ms(),
                level,
                text,
            });
            if state.console.len() == CONSOLE_LOG_QUEUE_COUNT_MAX {
                state.console.pop_front();
                state.console_dropped += 1;
            }
            state.console.push_back(line);
        }
    }

    fn flush(&self) {}
}

/// Installs the logger with `[node role]` as the prefix of every line. `TANDEM_LOG=debug` shows
/// more, `TANDEM_LOG=warn` less.
pub fn install(node: &str, role: &str) {
    set_prefix(node, role);
    let level = match std::env::var("TANDEM_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Changes the prefix (the role changed).
pub fn set_prefix(node: &str, role: &str) {
    if let Ok(mut state) = LOGGER.state.lock() {
        state.prefix = format!("{node} {role}");
    }
}

/// The recent events, oldest first.
pub fn recent_events() -> Vec<Event> {
    LOGGER
        .state
        .lock()
        .map(|s| s.events.iter().cloned().collect())
        .unwrap_or_default()
}

/// Takes the lines waiting for the serial console, and how many were dropped because nobody
/// took them in time.
pub fn take_console_lines() -> (Vec<String>, u64) {
    match LOGGER.state.lock() {
        Ok(mut state) => {
            let dropped = std::mem::take(&mut state.console_dropped);
            (state.console.drain(..).collect(), dropped)
        }
        Err(_) => (Vec::new(), 0),
    }
}

/// Renders events as lines: UTC time, level, sentence.
pub fn render_events(events: &[Event]) -> String {
    let mut out = String::new();
    for event in events {
        out.push_str(&format!(
            "{} {:7} {}\n",
            utc(event.unix_ms),
            event.level,
            event.text
        ));
    }
    if out.is_empty() {
        out.push_str("no events yet\n");
    }
    out.pop();
    out
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC, from milliseconds since the epoch.
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_read_as_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(951_782_400_123), "2000-02-29 00:00:00.123");
        assert_eq!(utc(1_795_307_696_789), "2026-11-22 00:34:56.789");
    }

    #[test]
    fn events_render_one_per_line() {
        let events = [
            Event {
                unix_ms: 0,
                level: "info",
                text: "serving volume".to_string(),
            },
            Event {
                unix_ms: 1000,
                level: "warning",
                text: "peer lost".to_string(),
            },
        ];
        let text = render_events(&events);
        assert_eq!(
            text,
            "1970-01-01 00:00:00.000 info    serving volume\n1970-01-01 00:00:01.000 warning peer lost"
        );
        assert_eq!(render_events(&[]), "no events yet");
    }
}
