//! The pair's network in Linux network namespaces, as data: the two boards, their cables, the
//! namespaces and addresses, and the `ip` commands that build the lab and pull its cables.
//! Nothing here runs a command. `tandem demo` runs them (stopping at a failure or at Ctrl-C), and
//! so does the test harness's namespace lab (`tandem-tests`' `netns::Lab`, panicking at a
//! failure), so the demo shows the very set-up the failover tests check (DESIGN.md §7, layer 4).
//!
//! ```text
//!   <tag>a (nas-a)             <tag>w (wiring)                <tag>b (nas-b)
//!   hb0  10.99.n.1/24 ==== a-hb ─┐  br-hb   ┌─ b-hb ==== hb0  10.99.n.2/24
//!                                 └─────────┘
//!   lan0 10.77.n.11/24 === a-lan ─┐ br-lan  ┌─ b-lan === lan0 10.77.n.12/24
//!                                 │ 10.77.n.1 (gateway)
//!                                 └─ c-lan
//!                                      ║
//!                        <tag>c (client): lan0 10.77.n.50/24
//!   cluster IP 10.77.n.100/24, NBD on 10.77.n.100:10809
//! ```
//!
//! Every board and client interface is one end of a veth pair whose other end is a port of a
//! bridge in the wiring namespace. Interfaces are created inside the lab's own namespaces, never
//! in the host's, so their names are fixed and short; only the namespaces carry the tag. A pulled
//! cable is its far end (the bridge port) set down: the board's own interface stays
//! administratively up and loses carrier, as with a real cable.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

/// The heartbeat link's port on both boards.
pub const HEARTBEAT_PORT: u16 = 7788;
/// The lan link's port on both boards.
pub const LAN_PORT: u16 = 7789;
/// The NBD TCP port on the cluster IP.
pub const NBD_PORT: u16 = 10809;
/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

/// One of the two boards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Board {
    /// nas-a: 10.99.n.1 and 10.77.n.11, the preferred node.
    A,
    /// nas-b: 10.99.n.2 and 10.77.n.12.
    B,
}

impl Board {
    /// The node name: "nas-a" or "nas-b".
    pub fn name(self) -> &'static str {
        match self {
            Board::A => "nas-a",
            Board::B => "nas-b",
        }
    }

    /// The other board.
    pub fn peer(self) -> Board {
        match self {
            Board::A => Board::B,
            Board::B => Board::A,
        }
    }

    /// "a" or "b".
    pub fn letter(self) -> &'static str {
        match self {
            Board::A => "a",
            Board::B => "b",
        }
    }

    /// 0 or 1: the board's place in a pair of anything.
    pub(crate) fn index(self) -> usize {
        match self {
            Board::A => 0,
            Board::B => 1,
        }
    }
}

/// One of a board's two cables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cable {
    /// The direct heartbeat cable (`hb0`, bridge `br-hb`).
    Heartbeat,
    /// The LAN cable (`lan0`, bridge `br-lan`).
    Lan,
}

impl Cable {
    /// The board's interface: "hb0" or "lan0".
    pub fn ifname(self) -> &'static str {
        match self {
            Cable::Heartbeat => "hb0",
            Cable::Lan => "lan0",
        }
    }

    /// The bridge in the wiring namespace.
    fn bridge(self) -> &'static str {
        match self {
            Cable::Heartbeat => "br-hb",
            Cable::Lan => "br-lan",
        }
    }

    /// The far end (bridge port) of `board`'s cable, in the wiring namespace.
    fn far_end(self, board: Board) -> String {
        match self {
            Cable::Heartbeat => format!("{}-hb", board.letter()),
            Cable::Lan => format!("{}-lan", board.letter()),
        }
    }
}

/// One lab's names and addresses: its namespaces are `<tag>w`, `<tag>a`, `<tag>b` and
/// `<tag>c`, its subnets 10.99.n.0/24 (heartbeat) and 10.77.n.0/24 (LAN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wiring {
    tag: String,
    n: u8,
}

impl Wiring {
    /// The wiring of the lab tagged `tag` on subnet number `n`. Addresses live in the lab's own
    /// namespaces, so labs never clash even on the same subnet; distinct subnets only keep the
    /// logs of parallel labs apart.
    pub fn new(tag: String, n: u8) -> Wiring {
        Wiring { tag, n }
    }

    /// The prefix of the lab's namespaces' names.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The subnet number n (10.77.n.0/24, 10.99.n.0/24).
    pub fn subnet(&self) -> u8 {
        self.n
    }

    /// The lab's namespaces, in the order they are created (`ip netns add`), before
    /// [`Wiring::build_commands`].
    pub fn namespaces(&self) -> [String; 4] {
        [
            self.wiring_ns(),
            self.board_ns(Board::A),
            self.board_ns(Board::B),
            self.client_ns(),
        ]
    }

    /// The wiring namespace `<tag>w` (the two bridges).
    pub fn wiring_ns(&self) -> String {
        format!("{}w", self.tag)
    }

    /// A board's namespace: `<tag>a` or `<tag>b`.
    pub fn board_ns(&self, board: Board) -> String {
        format!("{}{}", self.tag, board.letter())
    }

    /// The client's namespace `<tag>c`.
    pub fn client_ns(&self) -> String {
        format!("{}c", self.tag)
    }

    /// A board's heartbeat address: 10.99.n.1 (a) or 10.99.n.2 (b).
    pub fn hb_ip(&self, board: Board) -> String {
        format!("10.99.{}.{}", self.n, 1 + board.index())
    }

    /// A board's fixed LAN address: 10.77.n.11 (a) or 10.77.n.12 (b).
    pub fn lan_ip(&self, board: Board) -> String {
        format!("10.77.{}.{}", self.n, 11 + board.index())
    }

    /// The client's address: 10.77.n.50.
    pub fn client_ip(&self) -> String {
        format!("10.77.{}.50", self.n)
    }

    /// The gateway (on `br-lan` in the wiring namespace), the uplink probe target: 10.77.n.1.
    pub fn gateway(&self) -> String {
        format!("10.77.{}.1", self.n)
    }

    /// The cluster IP: 10.77.n.100.
    pub fn cluster_ip(&self) -> String {
        format!("10.77.{}.100", self.n)
    }

    /// The cluster IP with its prefix, as `[cluster] vip` has it: 10.77.n.100/24.
    pub fn cluster_cidr(&self) -> String {
        format!("{}/24", self.cluster_ip())
    }

    /// The NBD TCP address on the cluster IP: 10.77.n.100:10809.
    pub fn nbd_addr(&self) -> SocketAddr {
        SocketAddr::from(([10, 77, self.n, 100], NBD_PORT))
    }

    /// The `ip` commands (arguments only) that wire the lab once its [namespaces] exist: loopback
    /// up everywhere, the two bridges, the gateway address, and the five cables.
    ///
    /// [namespaces]: Wiring::namespaces
    pub fn build_commands(&self) -> Vec<Vec<String>> {
        let w = self.wiring_ns();
        let mut commands: Vec<Vec<String>> = self
            .namespaces()
            .iter()
            .map(|ns| args(&["-n", ns, "link", "set", "lo", "up"]))
            .collect();
        for cable in [Cable::Heartbeat, Cable::Lan] {
            let bridge = cable.bridge();
            commands.push(args(&[
                "-n",
                &w,
                "link",
                "add",
                bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
            ]));
            commands.push(args(&["-n", &w, "link", "set", bridge, "up"]));
        }
        let gateway = format!("{}/24", self.gateway());
        commands.push(args(&["-n", &w, "addr", "add", &gateway, "dev", "br-lan"]));
        for board in [Board::A, Board::B] {
            for cable in [Cable::Heartbeat, Cable::Lan] {
                let address = match cable {
                    Cable::Heartbeat => self.hb_ip(board),
                    Cable::Lan => self.lan_ip(board),
                };
                commands.extend(self.veth_commands(
                    &self.board_ns(board),
                    cable.ifname(),
                    &address,
                    &cable.far_end(board),
                    cable.bridge(),
                ));
            }
        }
        let client = self.client_ns();
        commands.extend(self.veth_commands(&client, "lan0", &self.client_ip(), "c-lan", "br-lan"));
        commands
    }

    /// A veth pair: `ifname` in `ns` with `address`/24, up; its far end `far` a port of `bridge`
    /// in the wiring namespace, up.
    fn veth_commands(
        &self,
        ns: &str,
        ifname: &str,
        address: &str,
        far: &str,
        bridge: &str,
    ) -> [Vec<String>; 5] {
        let w = self.wiring_ns();
        let address = format!("{address}/24");
        [
            args(&[
                "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", far, "netns", &w,
            ]),
            args(&["-n", &w, "link", "set", far, "master", bridge]),
            args(&["-n", &w, "link", "set", far, "up"]),
            args(&["-n", ns, "addr", "add", &address, "dev", ifname]),
            args(&["-n", ns, "link", "set", ifname, "up"]),
        ]
    }

    /// The `ip` command that pulls `board`'s `cable` (`plugged` false: the bridge port goes
    /// down and the board's interface loses carrier) or plugs it back in.
    pub fn cable_command(&self, board: Board, cable: Cable, plugged: bool) -> Vec<String> {
        let state = if plugged { "up" } else { "down" };
        args(&[
            "-n",
            &self.wiring_ns(),
            "link",
            "set",
            &cable.far_end(board),
            state,
        ])
    }
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Moves the calling thread into the network namespace behind `handle` (a file of
/// [`NETNS_DIR`]). The thread stays there, and the sockets it makes belong to that network for
/// their whole life.
pub fn enter(handle: &fs::File) -> io::Result<()> {
    rustix::thread::move_into_link_name_space(
        handle.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_interface_is_created_before_it_is_used_and_lives_in_a_lab_namespace() {
        let wiring = Wiring::new("tx7".to_string(), 9);
        let namespaces = wiring.namespaces();
        assert_eq!(namespaces, ["tx7w", "tx7a", "tx7b", "tx7c"]);
        let mut created: Vec<(String, String)> = namespaces
            .iter()
            .map(|ns| (ns.clone(), "lo".to_string()))
            .collect();
        for command in wiring.build_commands() {
            let [dash_n, ns, rest @ ..] = command.as_slice() else {
                panic!("not an `ip -n NS` command: {command:?}");
            };
            assert_eq!(dash_n, "-n");
            assert!(namespaces.contains(ns), "{command:?} outside the lab");
            let words: Vec<&str> = rest.iter().map(String::as_str).collect();
            match words.as_slice() {
                ["link", "add", ifname, "type", "bridge", ..] => {
                    created.push((ns.clone(), ifname.to_string()));
                }
                ["link", "add", ifname, "type", "veth", "peer", "name", far, "netns", far_ns] => {
                    created.push((ns.clone(), ifname.to_string()));
                    created.push((far_ns.to_string(), far.to_string()));
                }
                ["link", "set", ifname, ..] | ["addr", "add", _, "dev", ifname] => assert!(
                    created.contains(&(ns.clone(), ifname.to_string())),
                    "{command:?} before {ifname} exists in {ns}"
                ),
                _ => panic!("unexpected command {command:?}"),
            }
        }
        // Both bridges, two cables per board, one for the client (two ends each).
        assert_eq!(created.len(), 4 + 2 + 5 * 2);
    }

    #[test]
    fn addresses_follow_the_plan_of_the_module_docs() {
        let wiring = Wiring::new("tx7".to_string(), 9);
        assert_eq!(wiring.hb_ip(Board::A), "10.99.9.1");
        assert_eq!(wiring.hb_ip(Board::B), "10.99.9.2");
        assert_eq!(wiring.lan_ip(Board::A), "10.77.9.11");
        assert_eq!(wiring.lan_ip(Board::B), "10.77.9.12");
        assert_eq!(wiring.client_ip(), "10.77.9.50");
        assert_eq!(wiring.gateway(), "10.77.9.1");
        assert_eq!(wiring.cluster_cidr(), "10.77.9.100/24");
        assert_eq!(wiring.nbd_addr().to_string(), "10.77.9.100:10809");
        let build = wiring.build_commands();
        for (ns, address, dev) in [
            ("tx7w", "10.77.9.1/24", "br-lan"),
            ("tx7a", "10.99.9.1/24", "hb0"),
            ("tx7a", "10.77.9.11/24", "lan0"),
            ("tx7b", "10.99.9.2/24", "hb0"),
            ("tx7b", "10.77.9.12/24", "lan0"),
            ("tx7c", "10.77.9.50/24", "lan0"),
        ] {
            assert!(
                build.contains(&args(&["-n", ns, "addr", "add", address, "dev", dev])),
                "{address} on {dev} in {ns}"
            );
        }
        assert_eq!(
            wiring.cable_command(Board::B, Cable::Lan, false),
            ["-n", "tx7w", "link", "set", "b-lan", "down"]
        );
        assert_eq!(
            wiring.cable_command(Board::A, Cable::Heartbeat, true),
            ["-n", "tx7w", "link", "set", "a-hb", "up"]
        );
    }
}
