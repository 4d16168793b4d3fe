//! The command table shared by the serial console and `tandem ctl`: parsing a line into a
//! [`Command`] and rendering replies for humans. `line` is the serial console's line editor.

pub mod line;

use crate::node::Status;

/// A command, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Show the node's state.
    Status,
    /// List the commands.
    Help,
    /// Hand the primary role to the peer.
    Switchover,
    /// Promote this node although its peer is not connected.
    PromoteForce,
    /// After a split brain: keep this node's data.
    ResolveSplitBrain {
        /// The node whose data wins.
        keep: String,
    },
    /// Start an online verify.
    Verify,
    /// Show recent events.
    Events,
    /// Show the running configuration (secrets masked).
    Config,
    /// Show both links to the peer.
    Links,
    /// Suspend (`true`) or resume automatic failover.
    Maintenance(bool),
}

impl Command {
    /// The command's name as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Help => "help",
            Command::Switchover => "switchover",
            Command::PromoteForce => "promote --force",
            Command::ResolveSplitBrain { .. } => "resolve-split-brain",
            Command::Verify => "verify",
            Command::Events => "events",
            Command::Config => "config",
            Command::Links => "links",
            Command::Maintenance(_) => "maintenance",
        }
    }
}

/// A line that is not a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// Nothing but blanks.
    Empty,
    /// The first word names no command.
    Unknown(String),
    /// The command exists but its arguments are wrong.
    BadArguments {
        /// The command.
        command: &'static str,
        /// How it is used.
        usage: &'static str,
    },
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Empty => write!(f, "empty command"),
            CommandError::Unknown(word) => {
                write!(f, "unknown command '{word}' (type 'help' for the list)")
            }
            CommandError::BadArguments { command, usage } => {
                write!(f, "{command}: wrong arguments; usage: {usage}")
            }
        }
    }
}

/// Parses one command line.
pub fn parse(line: &str) -> Result<Command, CommandError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&first, args)) = words.split_first() else {
        return Err(CommandError::Empty);
    };
    let no_args = |command: Command, usage: &'static str| {
        if args.is_empty() {
            Ok(command)
        } else {
            Err(CommandError::BadArguments {
                command: command.name(),
                usage,
            })
        }
    };
    match first {
        "status" => no_args(Command::Status, "status"),
        "help" => no_args(Command::Help, "help"),
        "switchover" => no_args(Command::Switchover, "switchover"),
        "verify" => no_args(Command::Verify, "verify"),
        "events" => no_args(Command::Events, "events"),
        "config" => no_args(Command::Config, "config"),
        "links" => no_args(Command::Links, "links"),
        "maintenance" => match args {
            ["on"] => Ok(Command::Maintenance(true)),
            ["off"] => Ok(Command::Maintenance(false)),
            _ => Err(CommandError::BadArguments {
                command: "maintenance",
                usage: "maintenance on|off",
            }),
        },
        "promote" => match args {
            ["--force"] => Ok(Command::PromoteForce),
            _ => Err(CommandError::BadArguments {
                command: "promote",
                usage: "promote --force",
            }),
        },
        "resolve-split-brain" => match args {
            ["--keep", node] => Ok(Command::ResolveSplitBrain {
                keep: (*node).to_string(),
            }),
            _ => Err(CommandError::BadArguments {
                command: "resolve-split-brain",
                usage: "resolve-split-brain --keep NODE",
            }),
        },
        other => Err(CommandError::Unknown(other.chars().take(64).collect())),
    }
}

/// The list of commands.
pub fn help_text() -> &'static str {
    "\
status                            role, disk, peer, links, readiness, resync progress
switchover                        hand the primary role to the peer
promote --force                   promote this node while its peer is not connected
resolve-split-brain --keep NODE   after a split brain, keep NODE's data
verify                            compare both copies of the volume online
events                            recent events
config                            the running configuration
links                             both links to the peer: state, last frame, round trip
maintenance on|off                suspend or resume automatic failover
help                              this list"
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `sync: [#####.....] 52% 1.2 GiB of 2.3 GiB, 140 MiB/s, ETA 8 s` (or the last resync).
fn sync_line(status: &Status) -> String {
    let sync = status.sync;
    if sync.total_bytes == 0 {
        return "sync: none".to_string();
    }
    let done = sync.done_bytes.min(sync.total_bytes);
    let percent = done * 100 / sync.total_bytes;
    let filled = (percent / 5) as usize;
    let bar: String = "#".repeat(filled) + &".".repeat(20 - filled);
    let rate = (done * 1000).checked_div(sync.elapsed_ms).unwrap_or(0);
    let mut line = format!(
        "sync: [{bar}] {percent}% {} of {}",
        human_bytes(done),
        human_bytes(sync.total_bytes)
    );
    if rate > 0 {
        line.push_str(&format!(", {}/s", human_bytes(rate)));
    }
    if status.sync_running {
        if rate > 0 {
            let eta_s = (sync.total_bytes - done).div_ceil(rate);
            line.push_str(&format!(", ETA {eta_s} s"));
        }
    } else {
        line.push_str(" (finished or interrupted)");
    }
    line
}

/// The compact human view of a status, in the spirit of `drbdadm status`.
pub fn render_status(status: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{} role:{} epoch:{}\n",
        status.node,
        status.role.name(),
        status.epoch
    ));
    out.push_str(&format!(
        "  volume disk:{} size:{} backing:{}\n",
        status.disk.name(),
        human_bytes(status.volume_bytes),
        status.backing
    ));
    if let Some(kernel) = &status.kernel {
        out.push_str(&format!("  kernel: {kernel}\n"));
    }
    out.push_str(&format!(
        "  peer:{} heartbeat:{} lan:{} uplink:{}\n",
        status.peer.name(),
        status.links.heartbeat,
        status.links.lan,
        status.uplink
    ));
    let readiness = if status.ready_for_failover {
        "ready"
    } else {
        "not ready"
    };
    out.push_str(&format!(
        "  failover: {} (auto:{})",
        readiness,
        if status.auto_failover { "on" } else { "off" }
    ));
    for reason in &status.not_ready_reasons {
        out.push_str(&format!("\n    - {reason}"));
    }
    if status.peer != crate::node::PeerState::None {
        out.push_str(&format!(
            "\n  generation:{} out-of-sync:{}",
            status.generation,
            human_bytes(status.out_of_sync_bytes)
        ));
        out.push_str(&format!("\n  {}", sync_line(status)));
        if let Some(verify) = &status.verify {
            out.push_str(&format!(
                "\n  verify: {} checked:{} mismatches:{}",
                if verify.running { "running" } else { "done" },
                human_bytes(verify.checked_bytes),
                verify.mismatches.len()
            ));
        }
    }
    for warning in &status.warnings {
        out.push_str(&format!("\n  warning: {warning}"));
    }
    out.push_str(&format!(
        "\n  clients:{} in-flight:{} reads:{} ({}) writes:{} ({}) flushes:{} errors:{}",
        status.clients,
        status.requests_in_flight,
        status.io.reads,
        human_bytes(status.io.read_bytes),
        status.io.writes,
        human_bytes(status.io.written_bytes),
        status.io.flushes,
        status.io.errors
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_parses_with_its_arguments() {
        assert_eq!(parse("status"), Ok(Command::Status));
        assert_eq!(parse("  help  "), Ok(Command::Help));
        assert_eq!(parse("promote --force"), Ok(Command::PromoteForce));
        assert_eq!(
            parse("resolve-split-brain --keep nas-a"),
            Ok(Command::ResolveSplitBrain {
                keep: "nas-a".to_string()
            })
        );
        assert_eq!(parse("switchover"), Ok(Command::Switchover));
        assert_eq!(parse("verify"), Ok(Command::Verify));
        assert_eq!(parse("events"), Ok(Command::Events));
        assert_eq!(parse("config"), Ok(Command::Config));
        assert_eq!(parse("links"), Ok(Command::Links));
        assert_eq!(parse("maintenance on"), Ok(Command::Maintenance(true)));
        assert_eq!(parse("maintenance off"), Ok(Command::Maintenance(false)));
        assert!(matches!(
            parse("maintenance"),
            Err(CommandError::BadArguments { .. })
        ));
    }

    #[test]
    fn wrong_arguments_and_unknown_words_are_refused() {
        assert_eq!(parse(""), Err(CommandError::Empty));
        assert!(matches!(
            parse("promote"),
            Err(CommandError::BadArguments { .. })
        ));
        assert!(matches!(
            parse("status now"),
            Err(CommandError::BadArguments { .. })
        ));
        assert!(matches!(
            parse("resolve-split-brain nas-a"),
            Err(CommandError::BadArguments { .. })
        ));
        assert_eq!(
            parse("reboot"),
            Err(CommandError::Unknown("reboot".to_string()))
        );
    }

    #[test]
    fn sizes_read_like_a_human_wrote_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }
}
