//! The log sink: sentences with key=value context, prefixed with the node and its role, on
//! stderr. (The console and the events ring join it with the operator's issue.)

use std::io::Write;
use std::sync::OnceLock;

struct StderrLogger {
    prefix: OnceLock<String>,
}

static LOGGER: StderrLogger = StderrLogger {
    prefix: OnceLock::new(),
};

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let prefix = self.prefix.get().map(String::as_str).unwrap_or("tandem");
        let level = match record.level() {
            log::Level::Error => "error: ",
            log::Level::Warn => "warning: ",
            _ => "",
        };
        // A failed write to stderr has nowhere better to be reported.
        let _ = writeln!(
            std::io::stderr().lock(),
            "[{prefix}] {level}{}",
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Installs the logger with `[node role]` as the prefix of every line. `TANDEM_LOG=debug` shows
/// more.
pub fn install(node: &str, role: &str) {
    let _ = LOGGER.prefix.set(format!("{node} {role}"));
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
