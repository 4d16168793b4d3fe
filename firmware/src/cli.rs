//! The `tandem` command line: `run`, `init`, `ctl`, `check-config`, `setup`, `demo`.

use crate::config::{self, Config, LoadError};
use crate::exit;
use crate::runtime::{self, Runtime};
use lexopt::prelude::*;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str = "\
usage: tandem <command> [options]

commands:
  run --config FILE                      run one node in the foreground until SIGTERM/SIGINT
  init --config FILE [--force]           write fresh tandem metadata on the backing device
  ctl --socket PATH [--json] [--yes] COMMAND...
                                         send one console command to a running node
  check-config FILE                      validate a config file
  setup --tty PATH --config-dir DIR --backing PATH [--control-socket PATH]
                                         an unconfigured board: the setup dialog on its console
  demo                                   a local pair, a pulled plug mid-copy, failover, checksums

'tandem <command> --help' describes each command.";

const RUN_USAGE: &str = "\
usage: tandem run --config FILE

Runs one node in the foreground until SIGTERM or SIGINT and logs to stderr.
Exit status: 0 after SIGTERM/SIGINT, 64 bad usage, 78 bad config, 66 backing device
missing or refused, 73 a socket in use, 70 internal error.";

const INIT_USAGE: &str = "\
usage: tandem init --config FILE [--force]

Writes fresh tandem metadata at the end of the configured backing device. Without --force
it refuses a device that already holds a tandem volume or carries a foreign signature
(a filesystem, RAID, LVM, a partition table). With --force the device's volume identity
is replaced: nothing else on it is touched, but a peer will resync it in full.";

const CTL_USAGE: &str = "\
usage: tandem ctl --socket PATH [--json] [--yes] COMMAND...

Sends one console command to the node listening on PATH and prints its reply. --json asks
for JSON (status). Commands that move the role or can discard data (switchover,
promote --force, resolve-split-brain) are refused without --yes: ctl never prompts.
Exit status: 0 on success, 1 when the node refuses the command, 69 when no node answers,
64 bad usage.";

const CHECK_USAGE: &str = "\
usage: tandem check-config FILE

Validates a config file and prints every problem with its line and key.
Exit status: 0 when the file is valid, 78 otherwise.";

/// A command-line problem: one line for the operator and an exit status.
#[derive(Debug)]
pub struct Failure {
    /// The exit status.
    pub code: u8,
    /// What went wrong (may span lines for config problems).
    pub message: String,
}

fn usage(message: impl std::fmt::Display, command: &str) -> Failure {
    Failure {
        code: exit::USAGE,
        message: format!("{message} (see 'tandem {command} --help')"),
    }
}

fn lexopt_failure(e: lexopt::Error, command: &str) -> Failure {
    usage(e, command)
}

/// Runs the command line; returns the exit status, or a failure to print.
pub fn main(args: Vec<OsString>) -> Result<u8, Failure> {
    let mut parser = lexopt::Parser::from_args(args);
    let command = match parser.next().map_err(|e| lexopt_failure(e, ""))? {
        Some(Value(command)) => command.string().map_err(|e| lexopt_failure(e, ""))?,
        Some(Long("help")) | Some(Short('h')) => {
            println!("{USAGE}");
            return Ok(exit::OK);
        }
        Some(Long("version")) => {
            println!("tandem {}", env!("CARGO_PKG_VERSION"));
            return Ok(exit::OK);
        }
        Some(other) => return Err(usage(other.unexpected(), "")),
        None => {
            return Err(Failure {
                code: exit::USAGE,
                message: USAGE.to_string(),
            });
        }
    };
    match command.as_str() {
        "run" => run(parser),
        "init" => init(parser),
        "ctl" => ctl(parser),
        "check-config" => check_config(parser),
        "setup" => setup(parser),
        "demo" => demo(parser),
        other => Err(usage(format!("unknown command '{other}'"), "")),
    }
}

fn config_path(
    parser: &mut lexopt::Parser,
    command: &str,
    help: &str,
    allow_force: bool,
) -> Result<Option<(PathBuf, bool)>, Failure> {
    let mut path = None;
    let mut force = false;
    while let Some(arg) = parser.next().map_err(|e| lexopt_failure(e, command))? {
        match arg {
            Long("config") | Short('c') => {
                path = Some(PathBuf::from(
                    parser.value().map_err(|e| lexopt_failure(e, command))?,
                ))
            }
            Long("force") if allow_force => force = true,
            Long("help") | Short('h') => {
                println!("{help}");
                return Ok(None);
            }
            other => return Err(usage(other.unexpected(), command)),
        }
    }
    match path {
        Some(path) => Ok(Some((path, force))),
        None => Err(usage("missing --config FILE", command)),
    }
}

/// Loads the config for `run` and `init`. A failure is one line (the first problem and how many
/// more); `check-config` lists them all.
fn load_config(path: &std::path::Path) -> Result<Config, Failure> {
    config::load(path).map_err(|e| {
        let message = match &e {
            LoadError::Unreadable { .. } => format!("cannot read the config: {e}"),
            LoadError::Invalid { path, problems } => {
                let first = problems.first().map(|p| p.to_string()).unwrap_or_default();
                match problems.len() {
                    0 | 1 => format!("{}: {first}", path.display()),
                    n => format!(
                        "{}: {first} (and {} more: see 'tandem check-config {}')",
                        path.display(),
                        n - 1,
                        path.display()
                    ),
                }
            }
        };
        Failure {
            code: exit::CONFIG,
            message,
        }
    })
}

fn run(mut parser: lexopt::Parser) -> Result<u8, Failure> {
    let Some((path, _)) = config_path(&mut parser, "run", RUN_USAGE, false)? else {
        return Ok(exit::OK);
    };
    let config = load_config(&path)?;
    let role = if config.is_standalone() {
        "standalone"
    } else {
        "secondary"
    };
    crate::logger::install(&config.node.name, role);
    let failure = |e: runtime::StartError| Failure {
        code: e.exit_code(),
        message: e.to_string(),
    };
    let runtime = Runtime::start(&config).map_err(failure)?;
    runtime.run().map_err(failure)?;
    Ok(exit::OK)
}

fn init(mut parser: lexopt::Parser) -> Result<u8, Failure> {
    let Some((path, force)) = config_path(&mut parser, "init", INIT_USAGE, true)? else {
        return Ok(exit::OK);
    };
    let config = load_config(&path)?;
    let volume = runtime::init(&config, force).map_err(|e| Failure {
        code: e.exit_code(),
        message: e.to_string(),
    })?;
    println!(
        "initialized {} (volume_bytes={})",
        config.volume.backing.display(),
        volume.layout.volume_bytes
    );
    Ok(exit::OK)
}

fn check_config(mut parser: lexopt::Parser) -> Result<u8, Failure> {
    let mut path = None;
    while let Some(arg) = parser
        .next()
        .map_err(|e| lexopt_failure(e, "check-config"))?
    {
        match arg {
            Value(value) if path.is_none() => path = Some(PathBuf::from(value)),
            Long("help") | Short('h') => {
                println!("{CHECK_USAGE}");
                return Ok(exit::OK);
            }
            other => return Err(usage(other.unexpected(), "check-config")),
        }
    }
    let Some(path) = path else {
        return Err(usage("missing FILE", "check-config"));
    };
    let config = config::load(&path).map_err(|e| Failure {
        code: exit::CONFIG,
        message: e.to_string(),
    })?;
    println!("{}: valid", path.display());
    if config.is_standalone() {
        println!("standalone node: no mirroring, no failover");
    } else {
        let missing: Vec<&str> = [
            ("vip", config.cluster.vip.is_none()),
            ("uplink_probe", config.cluster.uplink_probe.is_none()),
        ]
        .into_iter()
        .filter_map(|(key, absent)| absent.then_some(key))
        .collect();
        if missing.is_empty() {
            println!("automatic failover: on");
        } else {
            println!(
                "automatic failover: off: [cluster] {} not set; nothing would prove a lost peer \
                 stopped serving (DESIGN.md §4 rule 5); the pair mirrors, switches over on \
                 command and takes 'promote --force'",
                missing.join(" and ")
            );
        }
    }
    Ok(exit::OK)
}

/// Commands that move the role or can discard data: `ctl` needs `--yes` for them.
fn needs_confirmation(words: &[String]) -> bool {
    matches!(
        words.first().map(String::as_str),
        Some("switchover" | "promote" | "resolve-split-brain")
    )
}

fn ctl(mut parser: lexopt::Parser) -> Result<u8, Failure> {
    let mut socket = None;
    let mut json = false;
    let mut yes = false;
    let mut words: Vec<String> = Vec::new();
    while let Some(arg) = parser.next().map_err(|e| lexopt_failure(e, "ctl"))? {
        match arg {
            Long("socket") | Short('s') if words.is_empty() => {
                socket = Some(PathBuf::from(
                    parser.value().map_err(|e| lexopt_failure(e, "ctl"))?,
                ))
            }
            Long("json") => json = true,
            Long("yes") | Short('y') => yes = true,
            Long("help") | Short('h') if words.is_empty() => {
                println!("{CTL_USAGE}");
                return Ok(exit::OK);
            }
            Value(value) => words.push(value.string().map_err(|e| lexopt_failure(e, "ctl"))?),
            // Flags after the command word belong to the command (promote --force, --keep).
            Long(flag) if !words.is_empty() => words.push(format!("--{flag}")),
            other => return Err(usage(other.unexpected(), "ctl")),
        }
    }
    let Some(socket) = socket else {
        return Err(usage("missing --socket PATH", "ctl"));
    };
    if words.is_empty() {
        return Err(usage("missing COMMAND", "ctl"));
    }
    if needs_confirmation(&words) && !yes {
        return Err(Failure {
            code: exit::USAGE,
            message: format!(
                "'{}' moves the role or can discard data; ctl never prompts: add --yes to confirm",
                words.join(" ")
            ),
        });
    }
    let line = format!("{}{}\n", if json { "--json " } else { "" }, words.join(" "));
    let unreachable = |e: std::io::Error| Failure {
        code: 69,
        message: format!("no node answers on {}: {e}", socket.display()),
    };
    let mut stream = UnixStream::connect(&socket).map_err(unreachable)?;
    let timeout = Some(Duration::from_secs(30));
    stream.set_read_timeout(timeout).map_err(unreachable)?;
    stream.set_write_timeout(timeout).map_err(unreachable)?;
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(unreachable)?;
    let (status, body) = reply.split_once('\n').unwrap_or((reply.as_str(), ""));
    let body = body.strip_suffix('\n').unwrap_or(body);
    match status {
        "ok" => {
            if !body.is_empty() {
                println!("{body}");
            }
            Ok(exit::OK)
        }
        "error" => Err(Failure {
            code: exit::FAILED,
            message: body.to_string(),
        }),
        _ => Err(Failure {
            code: exit::FAILED,
            message: format!("the node on {} sent an unexpected reply", socket.display()),
        }),
    }
}

const SETUP_USAGE: &str = "\
usage: tandem setup --tty PATH --config-dir DIR --backing PATH [--control-socket PATH]

The unconfigured role of a freshly flashed board, while its config partition DIR holds no
tandem.toml. On the serial console PATH (115200 8N1) 'status' reports role unconfigured and
'setup' asks for this board's settings one question at a time (Enter takes the default,
Ctrl-C abandons), shows the tandem.toml they make and, once confirmed, writes it into DIR
(with cluster.key for a pair). --backing is the data disk the config names. With
--control-socket, 'tandem ctl --socket PATH status' is answered meanwhile, and the config
names that socket (default /run/tandem/ctl.sock).
Exit status: 0 once the configuration is written or after SIGTERM/SIGINT, 64 bad usage,
73 DIR is not a directory or already holds a tandem.toml, 70 the console cannot be used.";

fn setup(mut parser: lexopt::Parser) -> Result<u8, Failure> {
    let mut tty = None;
    let mut config_dir = None;
    let mut backing = None;
    let mut control_socket = None;
    while let Some(arg) = parser.next().map_err(|e| lexopt_failure(e, "setup"))? {
        let slot = match arg {
            Long("tty") => &mut tty,
            Long("config-dir") => &mut config_dir,
            Long("backing") => &mut backing,
            Long("control-socket") => &mut control_socket,
            Long("help") | Short('h') => {
                println!("{SETUP_USAGE}");
                return Ok(exit::OK);
            }
            other => return Err(usage(other.unexpected(), "setup")),
        };
        let value = parser.value().map_err(|e| lexopt_failure(e, "setup"))?;
        *slot = Some(value.string().map_err(|e| lexopt_failure(e, "setup"))?);
    }
    let missing = |flag: &str| usage(format!("missing {flag}"), "setup");
    let settings = crate::setup::SetupSettings {
        tty: tty.ok_or_else(|| missing("--tty PATH"))?,
        config_dir: config_dir.ok_or_else(|| missing("--config-dir DIR"))?,
        backing: backing.ok_or_else(|| missing("--backing PATH"))?,
        control_socket,
    };
    settings
        .check()
        .map_err(|message| usage(message, "setup"))?;
    let dir = PathBuf::from(&settings.config_dir);
    let cannot = |message: String| Failure {
        code: exit::CANT_CREATE,
        message,
    };
    if !dir.is_dir() {
        return Err(cannot(format!("{} is not a directory", dir.display())));
    }
    // The image runs setup when the partition has no tandem.toml or an empty one; a real one
    // is never replaced from here.
    let config = dir.join(crate::setup::CONFIG_FILE_NAME);
    if std::fs::metadata(&config).is_ok_and(|m| m.len() > 0) {
        return Err(cannot(format!(
            "{} exists: this board is configured (remove it to set the board up again)",
            config.display()
        )));
    }
    crate::logger::install("tandem", "unconfigured");
    crate::setup::run(&settings).map_err(|e| Failure {
        code: e.exit_code(),
        message: e.to_string(),
    })?;
    Ok(exit::OK)
}

const DEMO_USAGE: &str = "\
usage: tandem demo

The seed experiment on this machine, in well under a minute: two nodes (nas-a, nas-b) on
sparse file-backed disks in a temporary directory, a client copying a 64 MiB file and 300
small ones through the primary, nas-a's power cut at 40% of the large file, nas-b taking
over, the interrupted file copied again as a user would, every file read back and its
SHA-256 compared; then nas-a back, its resync, the role back to nas-a, and the checksums
compared again. A summary ends it: failover time, bytes resynced, checksums.

As root with iproute2, the boards, their cables and the client live in network namespaces
with a cluster IP, and the failover is automatic. Otherwise both nodes run on loopback
addresses without a cluster IP, where automatic failover is off: the demo then acts as the
operator ('promote --force', 'switchover'). Everything it creates is removed at the end,
also on Ctrl-C; when it fails, the nodes' logs are kept and named.
Exit status: 0 when every checksum matches, 1 otherwise or when a step fails, 130 after
Ctrl-C or SIGTERM, 64 bad usage.";

fn demo(mut parser: lexopt::Parser) -> Result<u8, Failure> {
    if let Some(arg) = parser.next().map_err(|e| lexopt_failure(e, "demo"))? {
        if matches!(arg, Long("help") | Short('h')) {
            println!("{DEMO_USAGE}");
            return Ok(exit::OK);
        }
        return Err(usage(arg.unexpected(), "demo"));
    }
    Ok(crate::demo::run())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(args: &[&str]) -> Failure {
        let args = args.iter().map(OsString::from).collect();
        main(args).expect_err("a usage failure")
    }

    #[test]
    fn setup_help_succeeds_and_bad_usage_is_one_line_with_status_64() {
        let args = ["setup", "--help"].iter().map(OsString::from).collect();
        assert_eq!(main(args).ok(), Some(exit::OK));
        let cases: &[(&[&str], &str)] = &[
            (&["setup", "--bogus"], "invalid option '--bogus'"),
            (&["setup", "--tty"], "missing argument for option '--tty'"),
            (
                &["setup", "--config-dir", "/cfg", "--backing", "/dev/sda"],
                "missing --tty PATH",
            ),
            (
                &["setup", "--tty", "/dev/ttyS0", "--backing", "/dev/sda"],
                "missing --config-dir DIR",
            ),
            (
                &["setup", "--tty", "/dev/ttyS0", "--config-dir", "/cfg"],
                "missing --backing PATH",
            ),
            (
                &[
                    "setup",
                    "--tty",
                    "/dev/ttyS0",
                    "--config-dir",
                    "cfg",
                    "--backing",
                    "/dev/sda",
                ],
                "must be an absolute path",
            ),
        ];
        for (args, message) in cases {
            let failure = failure(args);
            assert_eq!(failure.code, exit::USAGE, "{args:?}");
            assert!(
                failure.message.contains(message),
                "{args:?}: {}",
                failure.message
            );
            assert!(
                failure.message.ends_with("(see 'tandem setup --help')"),
                "{}",
                failure.message
            );
            assert!(!failure.message.contains('\n'), "{}", failure.message);
        }
    }

    #[test]
    fn setup_refuses_a_config_dir_that_is_missing() {
        let failure = failure(&[
            "setup",
            "--tty",
            "/dev/ttyS0",
            "--config-dir",
            "/nonexistent/tandem-cfg",
            "--backing",
            "/dev/sda",
        ]);
        assert_eq!(failure.code, exit::CANT_CREATE);
        assert!(
            failure.message.contains("is not a directory"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn setup_never_replaces_a_written_config() {
        let dir = std::env::temp_dir().join(format!("tandem-cli-setup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("tandem.toml"), "[node]\n").expect("a config");
        let failure = failure(&[
            "setup",
            "--tty",
            "/dev/ttyS0",
            "--config-dir",
            dir.to_str().expect("utf-8"),
            "--backing",
            "/dev/sda",
        ]);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(failure.code, exit::CANT_CREATE);
        assert!(
            failure.message.contains("this board is configured"),
            "{}",
            failure.message
        );
    }
}
