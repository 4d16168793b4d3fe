//! The `unconfigured` role: what a freshly flashed board runs on its serial console while its
//! config partition holds no tandem.toml (`tandem setup`, INTERFACE.md).
//!
//! The board answers `status` (and `status --json`) with role `unconfigured`, and `setup` walks
//! the operator through this board's settings one question at a time. Every question shows a
//! default in brackets that Enter accepts; a wrong answer is explained and asked again; Ctrl-C
//! abandons the dialog. At the end the answers become a tandem.toml, checked by
//! [`config::parse`] like any other, shown, and written into the config directory once the
//! operator says `yes` (with `cluster.key` for a pair). Then the process ends and the board
//! restarts into `tandem run`.
//!
//! Two layers, as in the rest of the crate:
//!
//! - [`SetupConsole`] (with its `SetupDialog`) is sans-IO: lines in, [`Output`]s out. It never
//!   touches a file or the port; the randomness of a `new` cluster key is handed in by the
//!   caller, so the tests drive whole dialogs with a fixed key.
//! - [`run`] is the small IO loop: the serial port and its [`LineEditor`], the optional control
//!   socket (`tandem ctl --socket PATH [--json] status`), SIGTERM/SIGINT, and the files.
//!
//! Decisions beyond the contract:
//!
//! - The dialog is for the appliance: every address is IPv4 (the image configures the ports
//!   from them and the uplink probe is ARP), this board's addresses are specific ones, the
//!   cluster IP's subnet holds both boards' lan addresses, and the gateway is on that subnet.
//! - Defaults follow the appliance's network plan (INTERFACE.md's example): heartbeat
//!   10.99.0.1/.2, lan 192.168.131.231/.232, the cluster IP .230/24 of this board's lan subnet,
//!   the gateway the first address of the cluster IP's subnet. The board whose name sorts after
//!   its peer's takes the second address of each pair, and the one that sorts first is the
//!   default preferred node.
//! - cluster.key is written before tandem.toml: a tandem.toml on the partition means "configured",
//!   so it must never be there without the key it names.

use crate::config::{self, TomlWriter, Vip, CLUSTER_KEY_LEN};
use crate::console::line::{LineEditor, LineEvent};
use crate::console::{self, Command, CommandError};
use crate::constants::{CONTROL_CLIENT_TIMEOUT_MS, CONTROL_LINE_BYTES_MAX};
use crate::node::{CommandReply, DiskState, LinkStates, PeerState, Role, Status};
use crate::runtime::{self, StartError};
use rustix::event::{PollFd, PollFlags};
use std::fmt;
use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use tandem_board::{SerialError, SerialPort, TerminationSignals};

/// The first line the console shows.
pub const BANNER: &str = "tandem: this board is not configured; type 'setup' to configure it";

/// The prompt while no dialog runs (the runtime's is `NODE(ROLE)> `).
pub const PROMPT: &str = "tandem(unconfigured)> ";

/// The config file `setup` writes into the config directory.
pub const CONFIG_FILE_NAME: &str = "tandem.toml";

/// The cluster key file `setup` writes next to it (a pair only).
pub const KEY_FILE_NAME: &str = "cluster.key";

/// `console.control_socket` when `--control-socket` is not given.
pub const CONTROL_SOCKET_DEFAULT: &str = "/run/tandem/ctl.sock";

/// The cluster key's length in bytes.
pub const CLUSTER_KEY_BYTES: usize = CLUSTER_KEY_LEN as usize;

const NBD_SOCKET: &str = "/run/tandem/nbd.sock";
const ATTACH_DEVICE: &str = "/dev/nbd0";
const MOUNT_POINT: &str = "/data";
const WATCHDOG_DEVICE: &str = "/dev/watchdog0";
const WATCHDOG_TIMEOUT_S: u32 = 10;

const NODE_NAME_DEFAULT: &str = "nas-a";
/// The heartbeat addresses of the first and the second board.
const HEARTBEAT_DEFAULTS: [SocketAddrV4; 2] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 7788),
    SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 7788),
];
/// The lan addresses of the first and the second board.
const LAN_DEFAULTS: [SocketAddrV4; 2] = [
    SocketAddrV4::new(Ipv4Addr::new(192, 168, 131, 231), 7788),
    SocketAddrV4::new(Ipv4Addr::new(192, 168, 131, 232), 7788),
];
/// The default cluster IP is this host number in this board's lan /24.
const VIP_HOST_DEFAULT: u8 = 230;
const VIP_PREFIX_LEN_DEFAULT: u8 = 24;

// What `tandem run` reads from the key file.
const _: () = assert!(CLUSTER_KEY_BYTES == crate::peer::PEER_KEY_BYTES);

/// The shared secret of a pair. Its `Debug` never shows the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClusterKey(pub [u8; CLUSTER_KEY_BYTES]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// Hex in groups of 8 digits, easy to read out and type on the other board.
    pub fn to_hex_groups(&self) -> String {
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        let groups: Vec<&str> = (0..hex.len()).step_by(8).map(|i| &hex[i..i + 8]).collect();
        groups.join(" ")
    }

    /// 64 hex digits; blanks anywhere are ignored (the key is shown in groups).
    fn parse(text: &str) -> Result<ClusterKey, String> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if let Some(bad) = digits.iter().find(|b| !b.is_ascii_hexdigit()) {
            return Err(format!(
                "'{}' is not a hex digit: a cluster key is {} hex digits, or new",
                char::from(*bad).escape_debug(),
                CLUSTER_KEY_BYTES * 2
            ));
        }
        if digits.len() != CLUSTER_KEY_BYTES * 2 {
            return Err(format!(
                "{} hex digits: a cluster key is {} hex digits ({CLUSTER_KEY_BYTES} bytes), or new",
                digits.len(),
                CLUSTER_KEY_BYTES * 2
            ));
        }
        // Every digit is a hex digit (checked above).
        let nibble = |digit: u8| char::from(digit).to_digit(16).unwrap_or(0) as u8;
        let mut key = [0u8; CLUSTER_KEY_BYTES];
        for (byte, pair) in key.iter_mut().zip(digits.chunks(2)) {
            *byte = (nibble(pair[0]) << 4) | nibble(pair[1]);
        }
        if key == [0; CLUSTER_KEY_BYTES] {
            return Err("a key of zeros is no secret: type new, or another key".to_string());
        }
        Ok(ClusterKey(key))
    }
}

/// What the command line fixes: the paths the written config names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupSettings {
    /// The serial console (`--tty`), also `console.tty` in the config.
    pub tty: String,
    /// The config partition (`--config-dir`): an absolute path, since `peer.key_file` names a
    /// file in it.
    pub config_dir: String,
    /// The data disk (`--backing`), `volume.backing` in the config.
    pub backing: String,
    /// `--control-socket`: answered while unconfigured, and `console.control_socket` in the
    /// config. Absent: not answered, and [`CONTROL_SOCKET_DEFAULT`] in the config.
    pub control_socket: Option<String>,
}

impl SetupSettings {
    fn key_file(&self) -> String {
        Path::new(&self.config_dir)
            .join(KEY_FILE_NAME)
            .to_string_lossy()
            .into_owned()
    }

    fn control_socket_in_config(&self) -> &str {
        self.control_socket
            .as_deref()
            .unwrap_or(CONTROL_SOCKET_DEFAULT)
    }

    /// Refuses settings that could never make a valid config, before any dialog: every path
    /// given, the config directory absolute, and a standalone config made of them valid.
    pub fn check(&self) -> Result<(), String> {
        let given = [
            ("--tty", Some(&self.tty)),
            ("--config-dir", Some(&self.config_dir)),
            ("--backing", Some(&self.backing)),
            ("--control-socket", self.control_socket.as_ref()),
        ];
        for (flag, value) in given {
            if value.is_some_and(|v| v.is_empty() || v.contains('\0')) {
                return Err(format!("{flag} needs a path"));
            }
        }
        if !Path::new(&self.config_dir).is_absolute() {
            return Err(format!(
                "--config-dir {} must be an absolute path: the config names the key file in it",
                self.config_dir
            ));
        }
        let answers = Answers {
            node: Some(NODE_NAME_DEFAULT.to_string()),
            ..Answers::default()
        };
        match config::parse(&config_text(self, &answers)) {
            Ok(_) => Ok(()),
            Err(problems) => {
                let problems: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
                Err(format!(
                    "these paths make an invalid config: {}",
                    problems.join("; ")
                ))
            }
        }
    }
}

/// The files the dialog asks to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFiles {
    /// The config directory.
    pub dir: PathBuf,
    /// The text of [`CONFIG_FILE_NAME`]; [`config::parse`] accepted it.
    pub config_text: String,
    /// The bytes of [`KEY_FILE_NAME`] (mode 0600), for a pair.
    pub key: Option<ClusterKey>,
}

/// What the console asks of the IO loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Show this text to the operator (one or more lines).
    Print(String),
    /// Write these files (key first), then report with [`SetupConsole::handle_written`].
    Write(ConfigFiles),
    /// The configuration is written: the process ends with status 0 and the board restarts.
    Exit,
}

/// Where the `new` cluster key comes from: the kernel in production, a fixed key in tests.
pub type DrawKey<'a> = &'a mut dyn FnMut() -> Result<ClusterKey, String>;

/// A command of the unconfigured console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConsoleCommand {
    Status { json: bool },
    Help,
    Setup,
}

const HELP: &str = "\
status                            this board's state: unconfigured ('status --json' for JSON)
setup                             configure this board, one question at a time (Ctrl-C abandons)
help                              this list";

/// The unconfigured console (see the module documentation): the prompt, its commands, and the
/// setup dialog while one runs.
#[derive(Debug)]
pub struct SetupConsole {
    settings: SetupSettings,
    dialog: Option<SetupDialog>,
}

impl SetupConsole {
    /// A console at its prompt.
    pub fn new(settings: SetupSettings) -> Self {
        SetupConsole {
            settings,
            dialog: None,
        }
    }

    /// The prompt to show: [`PROMPT`], or the question being asked.
    pub fn prompt(&self) -> String {
        match &self.dialog {
            Some(dialog) => dialog.prompt(&self.settings),
            None => PROMPT.to_string(),
        }
    }

    /// True while the setup dialog runs.
    pub fn is_in_dialog(&self) -> bool {
        self.dialog.is_some()
    }

    /// What `status` reports: role `unconfigured`, nothing else running. `uptime_s` is 0: no
    /// node has started.
    pub fn status(&self) -> Status {
        Status {
            node: String::new(),
            role: Role::Unconfigured,
            disk: DiskState::Diskless,
            peer: PeerState::None,
            links: LinkStates {
                heartbeat: "down",
                lan: "down",
            },
            link_rtt_ms: Default::default(),
            watchdog: Default::default(),
            uplink: "unknown",
            epoch: 0,
            auto_failover: false,
            maintenance: false,
            ready_for_failover: false,
            not_ready_reasons: vec!["not configured".to_string()],
            warnings: Vec::new(),
            sync: Default::default(),
            sync_running: false,
            out_of_sync_bytes: 0,
            generation: String::new(),
            verify: None,
            volume_bytes: 0,
            backing: self.settings.backing.clone(),
            kernel: None,
            uptime_s: 0,
            clients: 0,
            requests_in_flight: 0,
            io: Default::default(),
        }
    }

    /// One line typed on the serial console (Enter on a blank line is an empty line).
    pub fn handle_line(&mut self, line: &str, draw_key: DrawKey<'_>) -> Vec<Output> {
        if let Some(dialog) = self.dialog.as_mut() {
            return match dialog.handle_answer(&self.settings, line, draw_key) {
                Step::Ask(text) => vec![Output::Print(text)],
                Step::Write(files) => vec![Output::Write(files)],
                Step::Quit(text) => {
                    self.dialog = None;
                    vec![Output::Print(text)]
                }
            };
        }
        match parse_command(line) {
            Ok(None) => Vec::new(),
            Ok(Some(ConsoleCommand::Setup)) => {
                self.dialog = Some(SetupDialog::new());
                vec![Output::Print(format!(
                    "Setting up this board: Enter takes the default in brackets, Ctrl-C abandons.\n{}",
                    SetupDialog::FIRST.help()
                ))]
            }
            Ok(Some(command)) => {
                let reply = self.answer(command);
                vec![Output::Print(if reply.ok {
                    reply.text
                } else {
                    format!("error: {}", reply.text)
                })]
            }
            Err(message) => vec![Output::Print(message)],
        }
    }

    /// Ctrl-C: abandons the dialog (nothing is written); nothing at the prompt.
    pub fn handle_cancel(&mut self) -> Vec<Output> {
        match self.dialog.take() {
            Some(_) => vec![Output::Print(
                "setup abandoned; nothing written (type 'setup' to start again)".to_string(),
            )],
            None => Vec::new(),
        }
    }

    /// The result of an [`Output::Write`]. After a failure the operator may try again.
    pub fn handle_written(&mut self, result: Result<(), String>) -> Vec<Output> {
        match result {
            Ok(()) => {
                self.dialog = None;
                vec![
                    Output::Print(
                        "configuration written; the board restarts to start tandem".to_string(),
                    ),
                    Output::Exit,
                ]
            }
            Err(error) => vec![Output::Print(format!(
                "the configuration was not written: {error}"
            ))],
        }
    }

    /// One request line from the control socket (`[--json] COMMAND`): what `tandem ctl` gets.
    /// The dialog is for the serial console only.
    pub fn handle_control(&self, line: &str) -> CommandReply {
        match parse_command(line) {
            Ok(Some(command)) => self.answer(command),
            Ok(None) => CommandReply {
                ok: false,
                text: "empty command".to_string(),
            },
            Err(text) => CommandReply { ok: false, text },
        }
    }

    fn answer(&self, command: ConsoleCommand) -> CommandReply {
        match command {
            ConsoleCommand::Status { json: true } => {
                match serde_json::to_string_pretty(&self.status()) {
                    Ok(text) => CommandReply { ok: true, text },
                    Err(e) => CommandReply {
                        ok: false,
                        text: format!("status: cannot encode: {e}"),
                    },
                }
            }
            ConsoleCommand::Status { json: false } => CommandReply {
                ok: true,
                text: "tandem role:unconfigured\n  no configuration on the config partition: \
                       type 'setup'"
                    .to_string(),
            },
            ConsoleCommand::Help => CommandReply {
                ok: true,
                text: HELP.to_string(),
            },
            // The serial console starts the dialog itself; this is what the control socket gets.
            ConsoleCommand::Setup => CommandReply {
                ok: false,
                text: format!(
                    "setup is a dialog on the serial console ({})",
                    self.settings.tty
                ),
            },
        }
    }
}

/// `[--json] COMMAND` (the flag anywhere); `None` for a blank line. The commands of a configured
/// node are named as such, anything else is unknown.
fn parse_command(line: &str) -> Result<Option<ConsoleCommand>, String> {
    let (json, words) = runtime::split_json_flag(line);
    if words.is_empty() && !json {
        return Ok(None);
    }
    if words == "setup" {
        return Ok(Some(ConsoleCommand::Setup));
    }
    match console::parse(&words) {
        Ok(Command::Status) => Ok(Some(ConsoleCommand::Status { json })),
        Ok(Command::Help) => Ok(Some(ConsoleCommand::Help)),
        Ok(command) => Err(format!(
            "'{}' needs a configured board: type 'setup' first",
            command.name()
        )),
        Err(CommandError::Unknown(word)) if word == "setup" => Err(CommandError::BadArguments {
            command: "setup",
            usage: "setup",
        }
        .to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// What one answer leads to.
#[derive(Debug)]
enum Step {
    /// Print this, then show the (next or same) question.
    Ask(String),
    /// The operator confirmed: write these files.
    Write(ConfigFiles),
    /// The dialog is over without writing; print this and return to the prompt.
    Quit(String),
}

/// The questions, in order. A standalone node stops after `PeerName`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Question {
    NodeName,
    PeerName,
    HeartbeatLocal,
    HeartbeatRemote,
    LanLocal,
    LanRemote,
    ClusterIp,
    UplinkProbe,
    Preferred,
    Key,
}

impl Question {
    /// The prompt's words, before the default.
    fn label(self) -> &'static str {
        match self {
            Question::NodeName => "node name",
            Question::PeerName => "peer name",
            Question::HeartbeatLocal => "heartbeat local IP:PORT",
            Question::HeartbeatRemote => "heartbeat remote IP:PORT",
            Question::LanLocal => "lan local IP:PORT",
            Question::LanRemote => "lan remote IP:PORT",
            Question::ClusterIp => "cluster IP/prefix",
            Question::UplinkProbe => "gateway to probe",
            Question::Preferred => "preferred node",
            Question::Key => "cluster key",
        }
    }

    /// Printed once when the question is first asked.
    fn help(self) -> &'static str {
        match self {
            Question::NodeName => "This board's name: 1 to 63 characters of A-Z a-z 0-9 . _ -",
            Question::PeerName => {
                "The other board's name, or none (Enter) for a standalone node: no mirroring, \
                 no failover."
            }
            Question::HeartbeatLocal => {
                "The heartbeat link is the direct cable between the boards: this board's end."
            }
            Question::HeartbeatRemote => "The other board's end of the heartbeat cable.",
            Question::LanLocal => "The lan link goes through the switch: this board's address.",
            Question::LanRemote => "The other board's lan address.",
            Question::ClusterIp => {
                "The cluster IP clients use, with its prefix length; it moves with the \
                 primary role."
            }
            Question::UplinkProbe => {
                "A gateway on the lan: a board that cannot reach it gives the role up."
            }
            Question::Preferred => "The board that takes the primary role when both could.",
            Question::Key => {
                "The cluster key authenticates the boards to each other: 64 hex digits (the \
                 key the other board's setup showed), or new to draw one."
            }
        }
    }

    /// The question after this one; `None` when every answer is in (a standalone node needs
    /// none after `PeerName`).
    fn next(self, answers: &Answers) -> Option<Question> {
        match self {
            Question::NodeName => Some(Question::PeerName),
            Question::PeerName if answers.peer.is_none() => None,
            Question::PeerName => Some(Question::HeartbeatLocal),
            Question::HeartbeatLocal => Some(Question::HeartbeatRemote),
            Question::HeartbeatRemote => Some(Question::LanLocal),
            Question::LanLocal => Some(Question::LanRemote),
            Question::LanRemote => Some(Question::ClusterIp),
            Question::ClusterIp => Some(Question::UplinkProbe),
            Question::UplinkProbe => Some(Question::Preferred),
            Question::Preferred => Some(Question::Key),
            Question::Key => None,
        }
    }
}

/// The answers so far; each one passed its checks.
#[derive(Debug, Clone, Default)]
struct Answers {
    node: Option<String>,
    /// `None` after `PeerName` means a standalone node.
    peer: Option<String>,
    heartbeat_local: Option<SocketAddrV4>,
    heartbeat_remote: Option<SocketAddrV4>,
    lan_local: Option<SocketAddrV4>,
    lan_remote: Option<SocketAddrV4>,
    vip: Option<Vip>,
    uplink_probe: Option<Ipv4Addr>,
    preferred: Option<String>,
    key: Option<ClusterKey>,
}

impl Answers {
    /// 0 for the board whose name sorts first (or a standalone node), 1 for the other: the
    /// index into the default address pairs.
    fn board_index(&self) -> usize {
        match (&self.node, &self.peer) {
            (Some(node), Some(peer)) if node > peer => 1,
            _ => 0,
        }
    }

    /// What Enter answers to `question`; `None` when it needs a typed answer.
    fn default_for(&self, question: Question) -> Option<String> {
        let board = self.board_index();
        match question {
            Question::NodeName => Some(NODE_NAME_DEFAULT.to_string()),
            Question::PeerName => Some("none".to_string()),
            Question::HeartbeatLocal => Some(HEARTBEAT_DEFAULTS[board].to_string()),
            Question::HeartbeatRemote => {
                Some(other_end(self.heartbeat_local?, HEARTBEAT_DEFAULTS, board).to_string())
            }
            Question::LanLocal => Some(LAN_DEFAULTS[board].to_string()),
            Question::LanRemote => {
                Some(other_end(self.lan_local?, LAN_DEFAULTS, board).to_string())
            }
            Question::ClusterIp => {
                let [x, y, z, _] = self.lan_local?.ip().octets();
                let vip = Vip {
                    addr: Ipv4Addr::new(x, y, z, VIP_HOST_DEFAULT),
                    prefix_len: VIP_PREFIX_LEN_DEFAULT,
                };
                Some(vip.to_string())
            }
            Question::UplinkProbe => {
                let vip = self.vip?;
                let network = u32::from(vip.addr) & netmask(vip.prefix_len);
                let gateway = Ipv4Addr::from(network.checked_add(1)?);
                (gateway != vip.addr && in_subnet(gateway, &vip)).then(|| gateway.to_string())
            }
            Question::Preferred => {
                let (node, peer) = (self.node.as_ref()?, self.peer.as_ref()?);
                Some(node.min(peer).clone())
            }
            Question::Key => Some("new".to_string()),
        }
    }

    /// Checks `answer` to `question` and stores it; returns lines to show.
    fn take_answer(
        &mut self,
        question: Question,
        answer: &str,
        draw_key: DrawKey<'_>,
    ) -> Result<Vec<String>, String> {
        match question {
            Question::NodeName => {
                config::check_node_name(answer)?;
                self.node = Some(answer.to_string());
            }
            Question::PeerName => {
                if answer == "none" {
                    self.peer = None;
                    return Ok(vec![
                        "standalone node: no mirroring, no failover".to_string()
                    ]);
                }
                config::check_node_name(answer)?;
                if self.node.as_deref() == Some(answer) {
                    return Err(format!(
                        "\"{answer}\" is this board's name: the two boards need different names"
                    ));
                }
                self.peer = Some(answer.to_string());
            }
            // This board's ends of the links: the image puts these addresses on its ports.
            Question::HeartbeatLocal => self.heartbeat_local = Some(socket_addr(answer)?),
            Question::HeartbeatRemote => {
                self.heartbeat_remote =
                    Some(remote_addr(answer, self.heartbeat_local, "heartbeat")?)
            }
            Question::LanLocal => {
                let lan = socket_addr(answer)?;
                if self.heartbeat_local.is_some_and(|h| h.ip() == lan.ip()) {
                    return Err(format!(
                        "{} is this board's heartbeat address: the lan port needs its own",
                        lan.ip()
                    ));
                }
                self.lan_local = Some(lan);
            }
            Question::LanRemote => {
                self.lan_remote = Some(remote_addr(answer, self.lan_local, "lan")?)
            }
            Question::ClusterIp => self.vip = Some(cluster_ip(answer, self)?),
            Question::UplinkProbe => self.uplink_probe = Some(uplink_probe(answer, self)?),
            Question::Preferred => {
                let names = [self.node.as_deref(), self.peer.as_deref()];
                if !names.contains(&Some(answer)) {
                    return Err(format!(
                        "\"{}\" is neither {} nor {}",
                        answer.escape_debug(),
                        names[0].unwrap_or("?"),
                        names[1].unwrap_or("?")
                    ));
                }
                self.preferred = Some(answer.to_string());
            }
            Question::Key => {
                if answer != "new" {
                    self.key = Some(ClusterKey::parse(answer)?);
                    return Ok(Vec::new());
                }
                let key = draw_key()
                    .map_err(|e| format!("no key drawn ({e}): type one of 64 hex digits"))?;
                self.key = Some(key);
                return Ok(vec![
                    format!("new cluster key: {}", key.to_hex_groups()),
                    "Type this key at the other board's setup: both boards need the same one."
                        .to_string(),
                ]);
            }
        }
        Ok(Vec::new())
    }
}

/// Where the dialog stands.
#[derive(Debug)]
enum Stage {
    /// This question is being asked.
    Asking(Question),
    /// Every answer is in; the files they make were shown: write them?
    Confirming(ConfigFiles),
}

/// The setup dialog (see the module documentation): one question at a time, then the
/// tandem.toml, then the files to write.
#[derive(Debug)]
struct SetupDialog {
    stage: Stage,
    answers: Answers,
}

impl SetupDialog {
    /// The first question, whose help starts the dialog.
    const FIRST: Question = Question::NodeName;

    /// A dialog at its first question.
    fn new() -> Self {
        SetupDialog {
            stage: Stage::Asking(Self::FIRST),
            answers: Answers::default(),
        }
    }

    fn prompt(&self, settings: &SetupSettings) -> String {
        let question = match self.stage {
            Stage::Asking(question) => question,
            Stage::Confirming(_) => {
                return format!("write it to {}? [yes/no]: ", settings.config_dir)
            }
        };
        match self.answers.default_for(question) {
            Some(default) => format!("{} [{default}]: ", question.label()),
            None => format!("{}: ", question.label()),
        }
    }

    fn handle_answer(
        &mut self,
        settings: &SetupSettings,
        line: &str,
        draw_key: DrawKey<'_>,
    ) -> Step {
        let typed = line.trim();
        let question = match &self.stage {
            Stage::Asking(question) => *question,
            Stage::Confirming(files) => {
                return match typed {
                    "yes" => Step::Write(files.clone()),
                    "no" => Step::Quit(format!(
                        "nothing written to {} (type 'setup' to start again)",
                        settings.config_dir
                    )),
                    _ => Step::Ask("answer yes or no".to_string()),
                }
            }
        };
        let answer = match (typed.is_empty(), self.answers.default_for(question)) {
            (false, _) => typed.to_string(),
            (true, Some(default)) => default,
            (true, None) => return Step::Ask("an answer is needed here".to_string()),
        };
        let mut notes = match self.answers.take_answer(question, &answer, draw_key) {
            Ok(notes) => notes,
            Err(problem) => return Step::Ask(problem),
        };
        notes.push(match question.next(&self.answers) {
            Some(next) => {
                self.stage = Stage::Asking(next);
                next.help().to_string()
            }
            None => self.assemble(settings),
        });
        Step::Ask(notes.join("\n"))
    }

    /// Every answer is in: the config they make, checked like any other. Valid: shown, and the
    /// operator is asked to confirm. Invalid (the answers' own checks let something through):
    /// the problems are shown and the dialog starts over.
    fn assemble(&mut self, settings: &SetupSettings) -> String {
        let text = config_text(settings, &self.answers);
        match config::parse(&text) {
            Ok(_) => {
                let shown = format!("This is the {CONFIG_FILE_NAME} your answers make:\n\n{text}");
                self.stage = Stage::Confirming(ConfigFiles {
                    dir: PathBuf::from(&settings.config_dir),
                    config_text: text,
                    key: self.answers.peer.as_ref().and(self.answers.key),
                });
                shown
            }
            Err(problems) => {
                let problems: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
                *self = SetupDialog::new();
                format!(
                    "Your answers make a config that tandem refuses:\n{}\nStarting over.\n{}",
                    problems.join("\n"),
                    Self::FIRST.help()
                )
            }
        }
    }
}

/// The default for a link's remote end: the other address of the default pair, or the one the
/// board's place gives when this end is not one of the defaults.
fn other_end(local: SocketAddrV4, defaults: [SocketAddrV4; 2], board: usize) -> SocketAddrV4 {
    if local == defaults[0] {
        defaults[1]
    } else if local == defaults[1] {
        defaults[0]
    } else {
        defaults[1 - board]
    }
}

fn is_unicast(ip: Ipv4Addr) -> bool {
    !ip.is_unspecified() && !ip.is_multicast() && !ip.is_broadcast()
}

/// `IP:PORT`, IPv4, a unicast address and a port other than 0.
fn socket_addr(text: &str) -> Result<SocketAddrV4, String> {
    let Ok(addr) = text.parse::<SocketAddrV4>() else {
        return Err(format!(
            "\"{}\" is not an IPv4 address with a port: IP:PORT, e.g. 10.99.0.1:7788",
            text.escape_debug()
        ));
    };
    if !is_unicast(*addr.ip()) {
        return Err(format!("{} is not a unicast address", addr.ip()));
    }
    if addr.port() == 0 {
        return Err(format!("{addr} needs a port other than 0"));
    }
    Ok(addr)
}

/// The other board's end of a link: not this board's end.
fn remote_addr(
    text: &str,
    local: Option<SocketAddrV4>,
    link: &str,
) -> Result<SocketAddrV4, String> {
    let remote = socket_addr(text)?;
    if local.is_some_and(|local| local.ip() == remote.ip()) {
        return Err(format!(
            "{} is this board's own {link} address: the other board's goes here",
            remote.ip()
        ));
    }
    Ok(remote)
}

fn netmask(prefix_len: u8) -> u32 {
    // prefix_len is 1..=32, so the shift is 0..=31.
    u32::MAX << (32 - u32::from(prefix_len.clamp(1, 32)))
}

fn in_subnet(ip: Ipv4Addr, vip: &Vip) -> bool {
    let mask = netmask(vip.prefix_len);
    u32::from(ip) & mask == u32::from(vip.addr) & mask
}

/// `a.b.c.d/N` as `cluster.vip` takes it, and a host address of a subnet that holds both
/// boards' lan addresses.
fn cluster_ip(text: &str, answers: &Answers) -> Result<Vip, String> {
    let vip = config::parse_vip(text)?;
    let Vip { addr, prefix_len } = vip;
    let host_bits = !netmask(prefix_len);
    if prefix_len <= 30 && (u32::from(addr) & host_bits == 0 || !u32::from(addr) & host_bits == 0) {
        return Err(format!(
            "{addr} is the network or broadcast address of {vip}: pick a host address"
        ));
    }
    let boards = [
        ("this board's", answers.lan_local),
        ("the other board's", answers.lan_remote),
    ];
    for (whose, lan) in boards {
        let Some(lan) = lan else { continue };
        if *lan.ip() == addr {
            return Err(format!(
                "{addr} is {whose} lan address: the cluster IP needs one of its own"
            ));
        }
        if !in_subnet(*lan.ip(), &vip) {
            return Err(format!(
                "{vip} does not hold {whose} lan address {}: the cluster IP goes on the lan's \
                 subnet",
                lan.ip()
            ));
        }
    }
    Ok(vip)
}

/// The gateway: an IPv4 address on the cluster IP's subnet (it is probed with ARP).
fn uplink_probe(text: &str, answers: &Answers) -> Result<Ipv4Addr, String> {
    let Ok(gateway) = text.parse::<Ipv4Addr>() else {
        return Err(format!(
            "\"{}\" is not an IPv4 address, e.g. 192.168.131.1",
            text.escape_debug()
        ));
    };
    if !is_unicast(gateway) {
        return Err(format!("{gateway} is not a unicast address"));
    }
    let boards = [
        answers.lan_local.map(|a| *a.ip()),
        answers.lan_remote.map(|a| *a.ip()),
        answers.vip.map(|v| v.addr),
    ];
    if boards.contains(&Some(gateway)) {
        return Err(format!(
            "{gateway} is a board's or the cluster's own address: the gateway is another machine"
        ));
    }
    if let Some(vip) = answers.vip {
        if !in_subnet(gateway, &vip) {
            return Err(format!(
                "{gateway} is outside {vip}: the gateway is probed with ARP, so it must be on \
                 the lan's subnet"
            ));
        }
    }
    Ok(gateway)
}

/// The tandem.toml of `answers` (a standalone node when there is no peer). A pair's answers are
/// all in once the dialog assembles its config; one missing would be written blank, and
/// [`config::parse`] refuses a blank value.
fn config_text(settings: &SetupSettings, answers: &Answers) -> String {
    fn shown(value: Option<impl ToString>) -> String {
        value.map(|v| v.to_string()).unwrap_or_default()
    }
    let link = |local: Option<SocketAddrV4>, remote: Option<SocketAddrV4>| {
        format!(
            "{{ local = {}, remote = {} }}",
            config::quote(&shown(local)),
            config::quote(&shown(remote))
        )
    };
    let mut out = TomlWriter::default();
    out.comment("Written by 'tandem setup' on the serial console.");
    out.section("node");
    out.string("name", &shown(answers.node.as_ref()));
    out.string("state_dir", config::STATE_DIR_DEFAULT);
    out.section("volume");
    out.string("backing", &settings.backing);
    out.string("nbd_socket", NBD_SOCKET);
    out.string("attach", ATTACH_DEVICE);
    out.string("mount", MOUNT_POINT);
    if let Some(peer) = &answers.peer {
        out.section("peer");
        out.string("name", peer);
        out.string("key_file", &settings.key_file());
        out.raw(
            "heartbeat",
            &link(answers.heartbeat_local, answers.heartbeat_remote),
        );
        out.raw("lan", &link(answers.lan_local, answers.lan_remote));
        out.section("cluster");
        out.string("vip", &shown(answers.vip));
        out.string("uplink_probe", &shown(answers.uplink_probe));
        out.string("preferred", &shown(answers.preferred.as_ref()));
    }
    out.section("watchdog");
    out.string("device", WATCHDOG_DEVICE);
    out.raw("timeout_s", &WATCHDOG_TIMEOUT_S.to_string());
    out.section("console");
    out.string("tty", &settings.tty);
    out.string("control_socket", settings.control_socket_in_config());
    out.text
}

// ---- the IO loop ----

/// Runs the unconfigured console on `settings.tty` until the configuration is written or
/// SIGTERM/SIGINT arrives (both `Ok`). With `settings.control_socket`, `tandem ctl` is answered
/// on it too. The port that cannot be opened or goes away is an error: without it nobody can
/// set the board up.
pub fn run(settings: &SetupSettings) -> Result<(), StartError> {
    let signals = TerminationSignals::install()
        .map_err(|e| StartError::Internal(format!("cannot take SIGTERM and SIGINT: {e}")))?;
    let mut port = SerialPort::open(Path::new(&settings.tty), runtime::CONSOLE_BAUD)
        .map_err(|e| StartError::Internal(format!("serial console {}: {e}", settings.tty)))?;
    let control = match &settings.control_socket {
        Some(path) => Some(ControlSocket {
            listener: runtime::bind_unix(Path::new(path), "control_socket")?,
            path: PathBuf::from(path),
        }),
        None => None,
    };
    let mut console = SetupConsole::new(settings.clone());
    let mut editor = LineEditor::new(console.prompt());
    editor.set_blank_lines(true);
    let mut out = Vec::new();
    editor.print_above(BANNER, &mut out);
    port.write_or_drop(&out);
    log::info!(
        "setup: waiting on the serial console (tty={})",
        settings.tty
    );
    loop {
        let mut fds = vec![
            PollFd::new(&signals, PollFlags::IN),
            PollFd::new(&port, PollFlags::IN),
        ];
        if let Some(control) = &control {
            fds.push(PollFd::new(&control.listener, PollFlags::IN));
        }
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(StartError::Internal(format!("poll: {e}"))),
        }
        let ready: Vec<bool> = fds.iter().map(|fd| !fd.revents().is_empty()).collect();
        drop(fds);
        if ready[0] && signals.take().is_some() {
            log::info!("setup: stopped by a signal; nothing written");
            return Ok(());
        }
        if ready[1] && read_serial(&mut port, &mut editor, &mut console)? {
            log::info!("setup: configuration written into {}", settings.config_dir);
            return Ok(());
        }
        if let (Some(control), Some(true)) = (&control, ready.get(2)) {
            control.serve(&console);
        }
    }
}

/// Reads what the operator typed and answers each complete line; true once the configuration
/// is written.
fn read_serial(
    port: &mut SerialPort,
    editor: &mut LineEditor,
    console: &mut SetupConsole,
) -> Result<bool, StartError> {
    let mut draw_key = || {
        runtime::random_bytes()
            .map(ClusterKey)
            .map_err(|e| format!("cannot draw random bytes: {e}"))
    };
    let mut buf = [0u8; 4096];
    loop {
        let n = match port.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(SerialError::HungUp) => {
                return Err(StartError::Internal(format!(
                    "serial console {}: hung up",
                    port.path().display()
                )))
            }
            Err(e) => {
                log::warn!("setup: console read failed (error={e})");
                return Ok(false);
            }
        };
        for &byte in &buf[..n] {
            let mut out = Vec::new();
            let outputs = match editor.feed_byte(byte, &mut out) {
                LineEvent::Line(line) => console.handle_line(&line, &mut draw_key),
                LineEvent::Cancelled => console.handle_cancel(),
                LineEvent::Nothing => Vec::new(),
            };
            let finished = carry_out(outputs, console, editor, &mut out);
            port.write_or_drop(&out);
            if finished {
                return Ok(true);
            }
        }
    }
}

/// Carries out the console's outputs and shows their text above the (possibly new) prompt;
/// true once the configuration is written.
fn carry_out(
    outputs: Vec<Output>,
    console: &mut SetupConsole,
    editor: &mut LineEditor,
    out: &mut Vec<u8>,
) -> bool {
    let mut queue: std::collections::VecDeque<Output> = outputs.into();
    let mut text = String::new();
    let mut finished = false;
    while let Some(output) = queue.pop_front() {
        match output {
            Output::Print(line) => {
                text.push_str(&line);
                text.push('\n');
            }
            Output::Write(files) => queue.extend(console.handle_written(write_files(&files))),
            Output::Exit => finished = true,
        }
    }
    // The last words go out without a prompt under them.
    let prompt = if finished {
        String::new()
    } else {
        console.prompt()
    };
    let prompt_changed = editor.prompt() != prompt;
    editor.set_prompt(prompt);
    if !text.is_empty() {
        editor.print_above(&text, out);
    } else if prompt_changed {
        editor.redraw(out);
    }
    finished
}

/// Writes the key (if any), then the config: each durably and atomically.
fn write_files(files: &ConfigFiles) -> Result<(), String> {
    if let Some(key) = &files.key {
        write_atomically(&files.dir, KEY_FILE_NAME, &key.0, 0o600)?;
    }
    write_atomically(
        &files.dir,
        CONFIG_FILE_NAME,
        files.config_text.as_bytes(),
        0o644,
    )
}

/// A temporary file in `dir`, written and fsynced, renamed over `name`, then the directory
/// fsynced: after a power cut the file is either absent or whole.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), String> {
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.tmp"));
    let failed = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    // A temporary file left by an earlier try may have another mode: start afresh.
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(failed(e));
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

/// The control socket while unconfigured; removed when setup ends.
#[derive(Debug)]
struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Answers every waiting `tandem ctl` with the runtime's protocol: one request line, a
    /// reply that starts with `ok` or `error` on its own line. Each client is served at once
    /// with a deadline: the socket is root's only (0600) and nothing here is time-critical, so
    /// a slow client may hold the console for that long, never longer.
    fn serve(&self, console: &SetupConsole) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("setup: control socket accept failed (error={e})");
                    return;
                }
            };
            answer_control(stream, console);
        }
    }
}

fn answer_control(stream: UnixStream, console: &SetupConsole) {
    let timeout = Some(std::time::Duration::from_millis(CONTROL_CLIENT_TIMEOUT_MS));
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(timeout).is_err()
        || stream.set_write_timeout(timeout).is_err()
    {
        return;
    }
    let mut line = Vec::new();
    let limit = CONTROL_LINE_BYTES_MAX as u64 + 1;
    let read = std::io::BufReader::new((&stream).take(limit)).read_until(b'\n', &mut line);
    let refused = |text: &str| CommandReply {
        ok: false,
        text: text.to_string(),
    };
    let reply = match read {
        Err(_) => refused("timed out waiting for a command line"),
        Ok(_) if line.len() > CONTROL_LINE_BYTES_MAX && !line.ends_with(b"\n") => {
            refused("command line too long")
        }
        Ok(_) => match std::str::from_utf8(&line) {
            Ok(line) => console.handle_control(line.trim()),
            Err(_) => refused("command is not UTF-8"),
        },
    };
    let _ = (&stream).write_all(runtime::control_reply(reply.ok, &reply.text).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, WatchdogDevice};

    fn settings() -> SetupSettings {
        SetupSettings {
            tty: "/dev/ttyS0".to_string(),
            config_dir: "/cfg".to_string(),
            backing: "/dev/disk/by-id/virtio-tandem-data".to_string(),
            control_socket: None,
        }
    }

    const KEY: [u8; CLUSTER_KEY_BYTES] = [0x5a; CLUSTER_KEY_BYTES];

    fn no_key() -> Result<ClusterKey, String> {
        panic!("no key should be drawn here")
    }

    /// Types `lines` one after another; returns every output.
    fn type_lines(console: &mut SetupConsole, lines: &[&str]) -> Vec<Output> {
        let mut draw = || Ok(ClusterKey(KEY));
        lines
            .iter()
            .flat_map(|line| console.handle_line(line, &mut draw))
            .collect()
    }

    fn printed(outputs: &[Output]) -> String {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Print(text) => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The files of the last `Write` among `outputs`.
    fn written(outputs: &[Output]) -> ConfigFiles {
        outputs
            .iter()
            .rev()
            .find_map(|o| match o {
                Output::Write(files) => Some(files.clone()),
                _ => None,
            })
            .expect("a write")
    }

    fn parsed(files: &ConfigFiles) -> Config {
        config::parse(&files.config_text).unwrap_or_else(|p| panic!("{p:?}\n{}", files.config_text))
    }

    #[test]
    fn a_standalone_dialog_of_defaults_writes_a_valid_config() {
        let mut console = SetupConsole::new(settings());
        // A standalone node has no key: none is drawn.
        let outputs: Vec<Output> = ["setup", "", ""]
            .iter()
            .flat_map(|line| console.handle_line(line, &mut no_key))
            .collect();
        assert!(printed(&outputs).contains("standalone node"));
        assert_eq!(console.prompt(), "write it to /cfg? [yes/no]: ");
        let outputs = type_lines(&mut console, &["yes"]);
        let files = written(&outputs);
        assert_eq!(files.dir, PathBuf::from("/cfg"));
        assert_eq!(files.key, None);
        let config = parsed(&files);
        assert_eq!(config.node.name, "nas-a");
        assert_eq!(config.node.state_dir, PathBuf::from("/var/lib/tandem"));
        assert!(config.is_standalone());
        let volume = &config.volume;
        assert_eq!(
            volume.backing,
            PathBuf::from("/dev/disk/by-id/virtio-tandem-data")
        );
        assert_eq!(volume.nbd_socket, PathBuf::from("/run/tandem/nbd.sock"));
        assert_eq!(volume.attach, Some(PathBuf::from("/dev/nbd0")));
        assert_eq!(volume.mount, Some(PathBuf::from("/data")));
        let watchdog = config.watchdog.expect("a watchdog");
        assert_eq!(
            watchdog.device,
            WatchdogDevice::Path("/dev/watchdog0".into())
        );
        assert_eq!(watchdog.timeout_s, 10);
        assert_eq!(config.console.tty, Some(PathBuf::from("/dev/ttyS0")));
        assert_eq!(
            config.console.control_socket,
            PathBuf::from("/run/tandem/ctl.sock")
        );
        // Written: the last words, then the end.
        let outputs = console.handle_written(Ok(()));
        assert_eq!(outputs.last(), Some(&Output::Exit));
        assert!(printed(&outputs).contains("configuration written"));
    }

    #[test]
    fn a_pair_dialog_for_the_second_board_swaps_the_default_addresses() {
        let mut console = SetupConsole::new(SetupSettings {
            control_socket: Some("/run/tandem/ctl.sock".to_string()),
            ..settings()
        });
        let key_hex = "0123456789abcdef".repeat(4);
        let outputs = type_lines(
            &mut console,
            &[
                "setup", "nas-b", "nas-a", "", "", "", "", "", "", "", &key_hex,
            ],
        );
        assert!(
            printed(&outputs).contains("This is the tandem.toml"),
            "{}",
            printed(&outputs)
        );
        let files = written(&type_lines(&mut console, &["yes"]));
        let config = parsed(&files);
        assert_eq!(config.node.name, "nas-b");
        let peer = config.peer.expect("a peer");
        assert_eq!(peer.name, "nas-a");
        assert_eq!(peer.key_file, PathBuf::from("/cfg/cluster.key"));
        assert_eq!(peer.heartbeat.local.to_string(), "10.99.0.2:7788");
        assert_eq!(peer.heartbeat.remote.to_string(), "10.99.0.1:7788");
        assert_eq!(peer.lan.local.to_string(), "192.168.131.232:7788");
        assert_eq!(peer.lan.remote.to_string(), "192.168.131.231:7788");
        let cluster = &config.cluster;
        assert_eq!(
            cluster.vip.map(|v| v.to_string()).as_deref(),
            Some("192.168.131.230/24")
        );
        assert_eq!(
            cluster.uplink_probe.map(|g| g.to_string()).as_deref(),
            Some("192.168.131.1")
        );
        assert_eq!(cluster.preferred.as_deref(), Some("nas-a"));
        let mut expected = [0u8; CLUSTER_KEY_BYTES];
        for (i, byte) in expected.iter_mut().enumerate() {
            *byte = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef][i % 8];
        }
        assert_eq!(files.key, Some(ClusterKey(expected)));
        assert!(config.watchdog.is_some());
    }

    #[test]
    fn typed_lan_addresses_move_the_cluster_ip_and_gateway_defaults() {
        let mut console = SetupConsole::new(settings());
        type_lines(
            &mut console,
            &[
                "setup",
                "",
                "nas-b",
                "",
                "",
                "10.1.2.11:7000",
                "10.1.2.12:7000",
            ],
        );
        assert_eq!(console.prompt(), "cluster IP/prefix [10.1.2.230/24]: ");
        type_lines(&mut console, &["10.1.2.100/25"]);
        assert_eq!(console.prompt(), "gateway to probe [10.1.2.1]: ");
        type_lines(&mut console, &["", "nas-b", "new"]);
        let config = parsed(&written(&type_lines(&mut console, &["yes"])));
        let peer = config.peer.expect("a peer");
        assert_eq!(peer.heartbeat.local.to_string(), "10.99.0.1:7788");
        assert_eq!(peer.lan.remote.to_string(), "10.1.2.12:7000");
        assert_eq!(config.cluster.preferred.as_deref(), Some("nas-b"));
    }

    #[test]
    fn bad_answers_are_explained_and_asked_again() {
        // (answer, what the reply says); each is typed at the question the good answers before
        // it reached, and the question must stay the same.
        let steps: &[(&str, Option<&str>)] = &[
            ("setup", None),
            ("nas a", Some("is not a node name")),
            ("nas-a", None),
            ("nas-a", Some("the two boards need different names")),
            ("nas-b", None),
            ("10.99.0.1", Some("is not an IPv4 address with a port")),
            ("[fd00::1]:7788", Some("is not an IPv4 address with a port")),
            ("10.99.0.1:0", Some("a port other than 0")),
            ("0.0.0.0:7788", Some("not a unicast address")),
            ("", None),
            ("10.99.0.1:7789", Some("this board's own heartbeat address")),
            ("", None),
            ("10.99.0.1:7790", Some("the lan port needs its own")),
            ("", None),
            ("", None),
            ("192.168.131.230", Some("no prefix length")),
            ("192.168.131.230/33", Some("between 1 and 32")),
            ("192.168.131.0/24", Some("network or broadcast")),
            ("192.168.131.231/24", Some("this board's lan address")),
            (
                "192.168.132.230/24",
                Some("does not hold this board's lan address"),
            ),
            (
                "192.168.131.230/30",
                Some("does not hold the other board's lan address"),
            ),
            ("", None),
            ("gateway", Some("is not an IPv4 address")),
            ("10.0.0.1", Some("outside 192.168.131.230/24")),
            ("192.168.131.230", Some("the gateway is another machine")),
            ("", None),
            ("nas-c", Some("is neither nas-a nor nas-b")),
            ("", None),
            ("abc", Some("3 hex digits")),
            (&"0g".repeat(32), Some("'g' is not a hex digit")),
            (&"00".repeat(32), Some("a key of zeros")),
            ("new", None),
            ("maybe", Some("answer yes or no")),
            ("", Some("answer yes or no")),
        ];
        let mut console = SetupConsole::new(settings());
        for (answer, problem) in steps {
            let prompt = console.prompt();
            let outputs = type_lines(&mut console, &[answer]);
            let text = printed(&outputs);
            match problem {
                Some(problem) => {
                    assert!(text.contains(problem), "{answer:?}: {text:?}");
                    assert_eq!(console.prompt(), prompt, "{answer:?} is asked again");
                }
                None => assert_ne!(console.prompt(), prompt, "{answer:?}: {text:?}"),
            }
        }
        assert!(console.prompt().starts_with("write it to /cfg?"));
    }

    #[test]
    fn new_draws_a_key_shows_it_and_writes_it() {
        let mut console = SetupConsole::new(settings());
        type_lines(
            &mut console,
            &["setup", "", "nas-b", "", "", "", "", "", "", ""],
        );
        assert_eq!(console.prompt(), "cluster key [new]: ");
        // A kernel that gives no randomness: the operator is told and may type a key.
        let outputs = console.handle_line("", &mut || Err("no entropy".to_string()));
        assert!(printed(&outputs).contains("no key drawn (no entropy)"));
        assert_eq!(console.prompt(), "cluster key [new]: ");
        let outputs = type_lines(&mut console, &["new"]);
        let text = printed(&outputs);
        assert!(
            text.contains(&format!("new cluster key: {}", ["5a5a5a5a"; 8].join(" "))),
            "{text}"
        );
        assert!(text.contains("key_file = \"/cfg/cluster.key\""), "{text}");
        let files = written(&type_lines(&mut console, &["yes"]));
        assert_eq!(files.key, Some(ClusterKey(KEY)));
        // The key shown is the key typed on the other board: it reads back.
        assert_eq!(
            ClusterKey::parse(&ClusterKey(KEY).to_hex_groups()),
            Ok(ClusterKey(KEY))
        );
        assert_eq!(format!("{:?}", files.key), "Some(ClusterKey(..))");
    }

    #[test]
    fn ctrl_c_abandons_the_dialog_and_the_prompt_comes_back() {
        let mut console = SetupConsole::new(settings());
        type_lines(&mut console, &["setup", "nas-a"]);
        assert!(console.is_in_dialog());
        let outputs = console.handle_cancel();
        assert!(printed(&outputs).contains("setup abandoned; nothing written"));
        assert!(!console.is_in_dialog());
        assert_eq!(console.prompt(), PROMPT);
        // Ctrl-C at the prompt does nothing; the commands work again; a new dialog starts fresh.
        assert!(console.handle_cancel().is_empty());
        assert!(printed(&type_lines(&mut console, &["status"])).contains("role:unconfigured"));
        type_lines(&mut console, &["setup"]);
        assert_eq!(console.prompt(), "node name [nas-a]: ");
    }

    #[test]
    fn no_at_the_end_writes_nothing_and_a_failed_write_is_asked_again() {
        let mut console = SetupConsole::new(settings());
        let outputs = type_lines(&mut console, &["setup", "", "", "no"]);
        assert!(printed(&outputs).contains("nothing written to /cfg"));
        assert!(!outputs.iter().any(|o| matches!(o, Output::Write(_))));
        assert_eq!(console.prompt(), PROMPT);

        type_lines(&mut console, &["setup", "", "", "yes"]);
        let outputs = console.handle_written(Err("cannot write /cfg/tandem.toml: EROFS".into()));
        assert!(printed(&outputs).contains("was not written: cannot write /cfg/tandem.toml"));
        assert!(!outputs.contains(&Output::Exit));
        assert_eq!(console.prompt(), "write it to /cfg? [yes/no]: ");
        assert!(matches!(
            type_lines(&mut console, &["yes"]).as_slice(),
            [Output::Write(_)]
        ));
    }

    #[test]
    fn status_json_has_every_interface_field_for_an_unconfigured_board() {
        let mut console = SetupConsole::new(settings());
        for line in ["status --json", "--json status"] {
            let text = printed(&type_lines(&mut console, &[line]));
            let json: serde_json::Value = serde_json::from_str(&text).expect(&text);
            let expected = serde_json::json!({
                "node": "",
                "role": "unconfigured",
                "disk": "diskless",
                "peer": "none",
                "links": {"heartbeat": "down", "lan": "down"},
                "uplink": "unknown",
                "epoch": 0,
                "auto_failover": false,
                "ready_for_failover": false,
                "not_ready_reasons": ["not configured"],
                "warnings": [],
                "volume_bytes": 0,
            });
            for (key, value) in expected.as_object().expect("an object") {
                assert_eq!(&json[key], value, "{key} in {text}");
            }
            assert_eq!(json["sync"]["done_bytes"], 0);
            assert_eq!(json["sync"]["total_bytes"], 0);
        }
        // The same through the control socket, also during a dialog.
        type_lines(&mut console, &["setup", "nas-a"]);
        let reply = console.handle_control("--json status");
        assert!(reply.ok);
        let json: serde_json::Value = serde_json::from_str(&reply.text).expect("JSON");
        assert_eq!(json["role"], "unconfigured");
    }

    #[test]
    fn the_prompt_answers_status_help_and_names_unknown_commands() {
        let mut console = SetupConsole::new(settings());
        assert_eq!(console.prompt(), "tandem(unconfigured)> ");
        assert_eq!(
            printed(&type_lines(&mut console, &["status"])),
            "tandem role:unconfigured\n  no configuration on the config partition: type 'setup'"
        );
        let help = printed(&type_lines(&mut console, &["help"]));
        for command in ["status", "setup", "help"] {
            assert!(help.lines().any(|l| l.starts_with(command)), "{help}");
        }
        assert_eq!(
            printed(&type_lines(&mut console, &["frobnicate now"])),
            "unknown command 'frobnicate' (type 'help' for the list)"
        );
        assert!(printed(&type_lines(&mut console, &["switchover"]))
            .contains("needs a configured board"));
        assert_eq!(
            printed(&type_lines(&mut console, &["setup now"])),
            "setup: wrong arguments; usage: setup"
        );
        assert!(!console.is_in_dialog());
        assert!(type_lines(&mut console, &["", "  "]).is_empty());
        let reply = console.handle_control("setup");
        assert!(!reply.ok && reply.text.contains("serial console (/dev/ttyS0)"));
        assert!(console.handle_control("status").ok);
        assert!(!console.handle_control("reboot").ok);
    }

    #[test]
    fn settings_that_cannot_make_a_config_are_refused_up_front() {
        assert_eq!(settings().check(), Ok(()));
        let relative = SetupSettings {
            config_dir: "cfg".to_string(),
            ..settings()
        };
        assert!(relative.check().unwrap_err().contains("absolute"));
        let empty = SetupSettings {
            backing: String::new(),
            ..settings()
        };
        assert!(empty
            .check()
            .unwrap_err()
            .contains("--backing needs a path"));
        let clash = SetupSettings {
            control_socket: Some(NBD_SOCKET.to_string()),
            ..settings()
        };
        assert!(clash
            .check()
            .unwrap_err()
            .contains("is also volume.nbd_socket"));
        let weird = SetupSettings {
            backing: "/dev/a \"b\" \\c".to_string(),
            ..settings()
        };
        assert_eq!(weird.check(), Ok(()));
    }

    #[test]
    fn files_are_written_key_first_with_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tandem-setup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let files = ConfigFiles {
            dir: dir.clone(),
            config_text: "x = 1\n".to_string(),
            key: Some(ClusterKey(KEY)),
        };
        write_files(&files).expect("written");
        write_files(&files).expect("written again over the first");
        let key = dir.join(KEY_FILE_NAME);
        assert_eq!(std::fs::read(&key).expect("key"), KEY);
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.join(CONFIG_FILE_NAME)).expect("config"),
            "x = 1\n"
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        let missing = ConfigFiles {
            dir: dir.join("absent"),
            ..files.clone()
        };
        assert!(write_files(&missing)
            .unwrap_err()
            .starts_with("cannot write"));
        // A key that cannot be written leaves no config behind: the key goes first.
        let stuck = dir.join("stuck");
        std::fs::create_dir_all(stuck.join(format!(".{KEY_FILE_NAME}.tmp"))).expect("temp dir");
        let stuck_files = ConfigFiles {
            dir: stuck.clone(),
            ..files
        };
        assert!(write_files(&stuck_files)
            .unwrap_err()
            .contains(KEY_FILE_NAME));
        assert!(!stuck.join(CONFIG_FILE_NAME).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Reads the pty master into `seen` until `needle` has arrived (30 s at most).
    fn read_until(master: &std::os::fd::OwnedFd, needle: &str, seen: &mut String) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !seen.contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} on the console; got {seen:?}"
            );
            let mut fds = [PollFd::new(master, PollFlags::IN)];
            let timeout = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            let _ = rustix::event::poll(&mut fds, Some(&timeout));
            let mut buf = [0u8; 4096];
            if let Ok(n) = rustix::io::read(master, &mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    }

    #[test]
    fn the_console_loop_sets_up_a_standalone_board_through_a_pseudo_terminal() {
        use rustix::pty::OpenptFlags;
        let dir = std::env::temp_dir().join(format!("tandem-setup-pty-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        rustix::pty::grantpt(&master).expect("grantpt");
        rustix::pty::unlockpt(&master).expect("unlockpt");
        rustix::io::ioctl_fionbio(&master, true).expect("non-blocking master");
        let tty = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
        let control = dir.join("ctl.sock");
        let settings = SetupSettings {
            tty: tty.to_str().expect("utf-8").to_string(),
            config_dir: dir.to_str().expect("utf-8").to_string(),
            backing: "/dev/vdb".to_string(),
            control_socket: Some(control.to_str().expect("utf-8").to_string()),
        };
        let loop_thread = std::thread::spawn({
            let settings = settings.clone();
            move || run(&settings)
        });
        let mut seen = String::new();
        read_until(&master, &format!("{BANNER}\r\n{PROMPT}"), &mut seen);

        // `tandem ctl --json status` meanwhile.
        let mut stream = UnixStream::connect(&control).expect("the control socket");
        stream.write_all(b"--json status\n").expect("request");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("reply");
        assert!(reply.starts_with("ok\n{"), "{reply}");
        assert!(reply.contains("\"role\": \"unconfigured\""), "{reply}");

        let answer = |typed: &str, next: &str, seen: &mut String| {
            seen.clear();
            rustix::io::write(&master, typed.as_bytes()).expect("type");
            read_until(&master, next, seen);
        };
        answer("setup\r", "node name [nas-a]: ", &mut seen);
        answer("\x03", PROMPT, &mut seen);
        assert!(seen.contains("setup abandoned"), "{seen:?}");
        answer("setup\r", "node name [nas-a]: ", &mut seen);
        answer("\r", "peer name [none]: ", &mut seen);
        answer("\r", "[yes/no]: ", &mut seen);
        answer("yes\r", "the board restarts to start tandem\r\n", &mut seen);
        assert!(matches!(loop_thread.join(), Ok(Ok(()))));

        let config = config::load(&dir.join(CONFIG_FILE_NAME)).expect("a valid config");
        assert_eq!(config.node.name, "nas-a");
        assert_eq!(config.console.control_socket, control);
        assert!(
            !control.exists(),
            "the control socket is removed at the end"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
