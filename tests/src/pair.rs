//! Two real `tandem` processes with a `[peer]` section on loopback addresses (nas-a on
//! 127.0.0.1, nas-b on 127.0.0.2), and what tests need around them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{free_port, Node, NodeConfig, BACKING_BYTES_DEFAULT};

/// nas-a's address.
pub const A_IP: &str = "127.0.0.1";
/// nas-b's address.
pub const B_IP: &str = "127.0.0.2";

/// The ports nas-b listens on (nas-a, whose name sorts first, connects).
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub heartbeat: u16,
    pub lan: u16,
}

impl Ports {
    /// Two free ports on nas-b's address.
    pub fn free() -> Ports {
        Ports {
            heartbeat: free_port(B_IP),
            lan: free_port(B_IP),
        }
    }
}

/// Writes a cluster key of 32 `byte`s, mode 0600.
pub fn write_key(path: &Path, byte: u8) {
    std::fs::write(path, [byte; 32]).expect("write key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
}

/// A node of the pair; `me`/`peer` are "a" or "b". `heartbeat_remote` overrides where nas-a
/// connects its heartbeat link (a proxy that a test can cut); `cluster` is extra `[cluster]`
/// TOML.
pub fn config(
    dir: &Path,
    me: &str,
    peer: &str,
    ports: &Ports,
    key: &Path,
    heartbeat_remote: Option<&str>,
    cluster: &str,
) -> NodeConfig {
    let (mine, theirs) = if me == "a" {
        (A_IP, B_IP)
    } else {
        (B_IP, A_IP)
    };
    let hb_remote = heartbeat_remote
        .map(str::to_string)
        .unwrap_or_else(|| format!("{theirs}:{}", ports.heartbeat));
    let mut config = NodeConfig::standalone(dir, &format!("nas-{me}"));
    config.extra_toml = format!(
        "\n[peer]\nname = \"nas-{peer}\"\nkey_file = \"{}\"\n\
         heartbeat = {{ local = \"{mine}:{hb}\", remote = \"{hb_remote}\" }}\n\
         lan = {{ local = \"{mine}:{lan}\", remote = \"{theirs}:{lan}\" }}\n\
         \n[cluster]\n{cluster}\n\
         \n[watchdog]\ndevice = \"none\"\ntimeout_s = 5\n",
        key.display(),
        hb = ports.heartbeat,
        lan = ports.lan,
    );
    config.create_backing(BACKING_BYTES_DEFAULT);
    config
}

/// Waits until `check` holds for the node's JSON status; panics with the status otherwise.
pub fn wait_status(
    node: &Node,
    what: &str,
    timeout: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = node.status_json();
        if check(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: status stayed {status:#}\n--- log:\n{}",
            node.stderr_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Both links up.
pub fn links_up(status: &serde_json::Value) -> bool {
    status["peer"] == "connected"
        && status["links"]["heartbeat"] == "up"
        && status["links"]["lan"] == "up"
}

/// Nothing heard on either link.
pub fn peer_lost(status: &serde_json::Value) -> bool {
    status["peer"] == "lost"
        && status["links"]["heartbeat"] == "down"
        && status["links"]["lan"] == "down"
}

/// A node in `role` with an up-to-date disk.
pub fn is(role: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |status| status["role"] == role && status["disk"] == "uptodate"
}

/// The first `len` bytes of a file.
pub fn file_head(path: &Path, len: u64) -> Vec<u8> {
    let mut bytes = std::fs::read(path).expect("read backing file");
    bytes.truncate(len as usize);
    bytes
}

/// A TCP forwarder for one link that a test can cut (a pulled cable: every connection through
/// it is dropped and new ones hang without an answer) and mend.
#[derive(Debug)]
pub struct Cable {
    /// Where nas-a connects.
    pub listen: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Cable {
    /// Forwards connections on `listen_ip` (a free port) to `target`, from `source_ip`.
    pub fn new(listen_ip: &str, source_ip: &str, target: &str) -> Cable {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind((listen_ip, 0)).expect("bind cable");
        let listen = listener.local_addr().expect("addr").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (cut2, gen2) = (cut.clone(), generation.clone());
        let source: PathBuf = PathBuf::from(source_ip);
        let target = target.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(inbound) = stream else { continue };
                if cut2.load(Ordering::SeqCst) {
                    // A pulled cable: the SYN is answered by nobody; hold it silently.
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(30));
                        drop(inbound);
                    });
                    continue;
                }
                let my_gen = gen2.load(Ordering::SeqCst);
                let Ok(outbound) = connect_from(source.to_str().unwrap_or("0.0.0.0"), &target)
                else {
                    continue;
                };
                for (from, to) in [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ] {
                    let (Ok(mut from), Ok(mut to)) = (from, to) else {
                        continue;
                    };
                    let (cut3, gen3) = (cut2.clone(), gen2.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 << 10];
                        loop {
                            let n = match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if cut3.load(Ordering::SeqCst) || gen3.load(Ordering::SeqCst) != my_gen
                            {
                                // Cut: bytes in flight vanish; the connection goes silent.
                                loop {
                                    std::thread::sleep(Duration::from_millis(50));
                                    if !cut3.load(Ordering::SeqCst) {
                                        break;
                                    }
                                }
                                break;
                            }
                            if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Cable {
            listen,
            cut,
            generation,
        }
    }

    /// Pulls the cable.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Plugs it back in.
    pub fn mend(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

fn connect_from(from: &str, to: &str) -> std::io::Result<std::net::TcpStream> {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)?;
    let local: std::net::SocketAddr = format!("{from}:0")
        .parse()
        .map_err(|_| std::io::Error::other("bad address"))?;
    rustix::net::bind(&fd, &local)?;
    let remote: std::net::SocketAddr = to
        .parse()
        .map_err(|_| std::io::Error::other("bad address"))?;
    rustix::net::connect(&fd, &remote)?;
    Ok(std::net::TcpStream::from(fd))
}
