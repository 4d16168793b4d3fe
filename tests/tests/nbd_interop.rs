//! Real NBD clients against a standalone node: nbdinfo, nbdcopy, qemu-img, qemu-io, fio's nbd
//! engine, libnbd's Python bindings, and a raw-socket client for what real clients never send.
//!
//! Each test starts its own node in its own temp dir, so the tests run in parallel. A test whose
//! tool is missing is skipped with a message (and fails under `CI=true`).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tandem_tests::nbd_wire::{cmd, cmd_flag, errno, opt, rep, tflag, RawClient};
use tandem_tests::{
    create_sparse_file, pseudo_random_bytes, read_file, require_python_nbd, require_tool,
    require_tools, run, run_with_timeout, wait_until, Node, TempDir, COMMAND_TIMEOUT,
};

const MIB: usize = 1024 * 1024;

/// The server's connection limit (the contract's named constant).
const CONNECTIONS_MAX: usize = 64;
/// Bytes of the largest payload the server accepts (NBD_INFO_BLOCK_SIZE maximum).
const PAYLOAD_BYTES_MAX: u32 = 32 * 1024 * 1024;

fn nbdinfo_size(uri: &str) -> u64 {
    let out = run("nbdinfo", &["--size", uri]);
    out.assert_success("nbdinfo --size");
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("nbdinfo --size printed {:?}: {e}", out.stdout))
}

fn sha256(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().expect("utf-8 path")]);
    out.assert_success("sha256sum");
    out.stdout
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

fn qemu_io(uri: &str, commands: &[String]) -> tandem_tests::CmdOutput {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    command.arg(uri);
    run_with_timeout(&mut command, COMMAND_TIMEOUT)
}

fn assert_qemu_io_ok(out: &tandem_tests::CmdOutput, what: &str) {
    out.assert_success(what);
    for bad in ["failed", "error", "Error"] {
        assert!(
            !out.stdout.contains(bad) && !out.stderr.contains(bad),
            "{what}: qemu-io reported {bad:?}\n--- stdout\n{}\n--- stderr\n{}",
            out.stdout,
            out.stderr
        );
    }
}

// ---------------------------------------------------------------------------------------------
// nbdinfo

#[test]
fn nbdinfo_reports_size_flags_structured_replies_and_block_sizes() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = TempDir::new("nbdinfo");
    let node = Node::start(&dir, "nas-a");
    let uri = node.nbd_uri();

    let out = run("nbdinfo", &["--json", &uri]);
    out.assert_success("nbdinfo --json");
    let info: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{}", out.stdout));
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(
        info["structured"], true,
        "structured replies in use: {info:#}"
    );
    let export = &info["exports"][0];
    let size = export["export-size"].as_u64().expect("export-size");
    assert_eq!(
        size,
        node.volume_bytes(),
        "nbdinfo size vs ctl volume_bytes"
    );
    assert!(
        size < tandem_tests::BACKING_BYTES_DEFAULT,
        "metadata lives at the end of the backing file, so the export ({size}) is smaller"
    );
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[flag], true, "{flag} advertised: {export:#}");
    }
    assert_eq!(export["is_read_only"], false, "{export:#}");
    assert_eq!(export["block_size_minimum"], 1, "{export:#}");
    assert_eq!(export["block_size_preferred"], 4096, "{export:#}");
    assert_eq!(export["block_size_maximum"], 33_554_432, "{export:#}");
    let contexts = export["contexts"].as_array().expect("contexts");
    assert!(
        contexts.iter().any(|c| c == "base:allocation"),
        "base:allocation offered: {export:#}"
    );

    // The named export and the default one are the same volume; an unknown name is refused.
    let named = format!("nbd+unix:///tandem?socket={}", node.nbd_socket().display());
    assert_eq!(nbdinfo_size(&named), size, "export \"tandem\"");
    let unknown = format!(
        "nbd+unix:///no-such-export?socket={}",
        node.nbd_socket().display()
    );
    let out = run("nbdinfo", &["--size", &unknown]);
    assert!(
        !out.status.success(),
        "unknown export name accepted: {}",
        out.stdout
    );
}

#[test]
fn nbdinfo_list_shows_the_export() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = TempDir::new("nbdlist");
    let node = Node::start(&dir, "nas-a");
    let out = run("nbdinfo", &["--list", "--json", &node.nbd_uri()]);
    out.assert_success("nbdinfo --list");
    let list: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --list --json: {e}\n{}", out.stdout));
    let exports = list["exports"].as_array().expect("exports array");
    assert!(!exports.is_empty(), "no export listed: {list:#}");
    let names: Vec<&str> = exports
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert!(
        names.iter().any(|n| n.is_empty() || *n == "tandem"),
        "listed exports {names:?}"
    );
    for export in exports {
        assert_eq!(
            export["export-size"].as_u64(),
            Some(node.volume_bytes()),
            "{export:#}"
        );
    }
}

/// `nbdinfo --map` lines as (offset, length, type).
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run("nbdinfo", &["--map", uri]);
    out.assert_success("nbdinfo --map");
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split_whitespace();
            let mut next = || f.next().unwrap_or_else(|| panic!("map line {l:?}"));
            let offset = next().parse().expect("offset");
            let length = next().parse().expect("length");
            let kind = next().parse().expect("type");
            (offset, length, kind)
        })
        .collect()
}

#[test]
fn nbdinfo_map_reports_a_hole_on_fresh_backing_and_data_after_a_write() {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("nbdmap");
    let node = Node::start(&dir, "nas-a");
    let uri = node.nbd_uri();
    let size = nbdinfo_size(&uri);

    let map = nbdinfo_map(&uri);
    assert!(!map.is_empty(), "empty map");
    assert_eq!(map[0].0, 0, "map starts at 0: {map:?}");
    assert_eq!(
        map.iter().map(|e| e.1).sum::<u64>(),
        size,
        "map covers the volume: {map:?}"
    );
    assert!(
        map.iter().all(|e| e.2 & 1 != 0),
        "a fresh sparse backing is all hole: {map:?}"
    );

    let out = qemu_io(&uri, &["write -P 0x3c 0 1M".into(), "flush".into()]);
    assert_qemu_io_ok(&out, "qemu-io write");
    let map = nbdinfo_map(&uri);
    assert_eq!(map[0].0, 0, "{map:?}");
    assert_eq!(map[0].2 & 1, 0, "first MiB is data after a write: {map:?}");
    assert!(
        map[0].1 >= MIB as u64,
        "data extent covers the write: {map:?}"
    );
    assert!(
        map.iter().any(|e| e.2 & 1 != 0),
        "the rest is still a hole: {map:?}"
    );
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), size, "{map:?}");
}

// ---------------------------------------------------------------------------------------------
// nbdcopy

fn nbdcopy_round_trip(label: &str, extra_args: &[&str]) {
    if !require_tools(&["nbdcopy", "nbdinfo", "sha256sum"]) {
        return;
    }
    let dir = TempDir::new(label);
    let node = Node::start(&dir, "nas-a");
    let uri = node.nbd_uri();
    let size = nbdinfo_size(&uri);
    let data_bytes = 64 * MIB;
    assert!(
        size >= data_bytes as u64,
        "volume of {size} bytes too small"
    );

    let src = dir.join("src.bin");
    std::fs::write(&src, pseudo_random_bytes(0x7a3d_0001, data_bytes)).expect("write src");
    let src_s = src.to_str().expect("utf-8 path");
    let mut args: Vec<&str> = extra_args.to_vec();
    args.extend([src_s, uri.as_str()]);
    run("nbdcopy", &args).assert_success("nbdcopy file -> volume");

    let out = dir.join("out.bin");
    let out_s = out.to_str().expect("utf-8 path");
    let mut args: Vec<&str> = extra_args.to_vec();
    args.extend([uri.as_str(), out_s]);
    run("nbdcopy", &args).assert_success("nbdcopy volume -> file");

    let copied = read_file(&out);
    assert_eq!(
        copied.len() as u64,
        size,
        "volume -> file copies the whole volume"
    );
    assert!(
        copied[data_bytes..].iter().all(|&b| b == 0),
        "the never-written rest of the volume reads as zeroes"
    );
    drop(copied);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .and_then(|f| f.set_len(data_bytes as u64))
        .expect("truncate out.bin");
    assert_eq!(
        sha256(&src),
        sha256(&out),
        "sha256 of file -> volume -> file"
    );
}

#[test]
fn nbdcopy_round_trip_of_64_mib_preserves_checksum() {
    nbdcopy_round_trip("nbdcopy1", &[]);
}

#[test]
fn nbdcopy_round_trip_with_four_connections_and_flush_preserves_checksum() {
    nbdcopy_round_trip("nbdcopy4", &["--connections=4", "--flush"]);
}

// ---------------------------------------------------------------------------------------------
// qemu-img

#[test]
fn qemu_img_convert_into_and_out_of_the_volume_compares_equal() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("qemuimg");
    let node = Node::start(&dir, "nas-a");
    let uri = node.nbd_uri();

    // Dirty the volume first, so that the zero runs of the source must really be written as
    // zeroes (qemu-img sends them as WRITE_ZEROES/TRIM, not as data).
    let out = qemu_io(&uri, &["write -P 0xff 0 40M".into()]);
    assert_qemu_io_ok(&out, "qemu-io dirty");

    // 32 MiB: pseudo-random 1 MiB runs alternating with zero runs.
    let mut image = pseudo_random_bytes(0x9e1, 32 * MIB);
    for run_index in (1..32).step_by(2) {
        image[run_index * MIB..(run_index + 1) * MIB].fill(0);
    }
    let src = dir.join("src.raw");
    std::fs::write(&src, &image).expect("write src");
    let src_s = src.to_str().expect("utf-8 path");

    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    )
    .assert_success("qemu-img convert file -> volume");
    // qemu-img compare over a 32 MiB raw view of the volume (an image-opts spec with
    // driver=nbd): identical. Over the whole volume: the first difference is the dirty tail.
    let view = format!(
        "driver=raw,size={},file.driver=nbd,file.server.type=unix,file.server.path={}",
        32 * MIB,
        node.nbd_socket().display()
    );
    let src_opts = format!("driver=raw,file.driver=file,file.filename={src_s}");
    let out = run("qemu-img", &["compare", "--image-opts", &src_opts, &view]);
    out.assert_success("qemu-img compare of the converted range");
    assert!(
        out.stdout.contains("Images are identical"),
        "{}",
        out.stdout
    );
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert_eq!(out.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("Content mismatch at offset {}!", 32 * MIB)),
        "the first difference is where the source ends: {}",
        out.stdout
    );

    let back = dir.join("back.raw");
    let back_s = back.to_str().expect("utf-8 path");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, back_s],
    )
    .assert_success("qemu-img convert volume -> file");
    let back_bytes = read_file(&back);
    assert_eq!(back_bytes.len() as u64, node.volume_bytes());
    assert!(
        back_bytes[..32 * MIB] == image[..],
        "file -> volume -> file differs in the converted range"
    );
    assert!(
        back_bytes[32 * MIB..40 * MIB].iter().all(|&b| b == 0xff),
        "bytes past the converted range kept their old contents"
    );

    // And qemu-img compare of the copied-back prefix must say identical.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&back)
        .and_then(|f| f.set_len(32 * MIB as u64))
        .expect("truncate back.raw");
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, back_s],
    )
    .assert_success("qemu-img compare src back");
}

#[test]
fn qemu_img_compare_of_freshly_converted_volume_is_identical() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("qemucmp");
    let node = Node::start(&dir, "nas-a");
    let uri = node.nbd_uri();
    let image = pseudo_random_bytes(0x51, 16 * MIB);
    let src = dir.join("src.raw");
    std::fs::write(&src, &image).expect("write src");
    let src_s = src.to_str().expect("utf-8 path");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    )
    .assert_success("qemu-img convert");
    // A fresh volume is zero past the source, so the images compare identical (qemu-img compare
    // treats the extra length of the larger image as must-be-zero).
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    out.assert_success("qemu-img compare");
    assert!(
        out.stdout.contains("Images are identical"),
        "{}",
        out.stdout
    );

    // Negative control: a changed byte in the volume is noticed.
    let out = qemu_io(&uri, &["write -P 0x01 4096 1".into()]);
    assert_qemu_io_ok(&out, "qemu-io poke");
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert_eq!(
        out.code(),
        Some(1),
        "compare notices a changed byte: {}",
        out.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// qemu-io

#[test]
fn qemu_io_patterns_zeroes_discard_flush_and_aio_work() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = TempDir::new("qemuio");
    let node = Node::start(&dir, "nas-a");
    let uri = node.nbd_uri();
    let size = node.volume_bytes();

    let mut commands: Vec<String> = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -f -P 0xcd 1M 1M",
        "read -P 0xcd 1M 1M",
        "write -z 512 4096",
        "read -P 0 512 4096",
        "read -P 0xab 0 512",
        "read -P 0xab 4608 4096",
        "write -P 0x11 2M 1M",
        "discard 2M 1M",
        "write -P 0x12 3M 64k",
        "flush",
        "read -P 0x12 3M 64k",
        "write -P 0x21 12345 777",
        "read -P 0x21 12345 777",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..64u64 {
        commands.push(format!(
            "aio_write -P {} {} 64k",
            i + 1,
            8 * MIB as u64 + i * 65536
        ));
    }
    commands.push("aio_flush".into());
    for i in 0..64u64 {
        commands.push(format!(
            "read -P {} {} 64k",
            i + 1,
            8 * MIB as u64 + i * 65536
        ));
    }
    commands.push(format!("write -P 0x99 {} 4096", size - 4096));
    commands.push(format!("read -P 0x99 {} 4096", size - 4096));
    let reads = commands.iter().filter(|c| c.starts_with("read ")).count();
    let out = qemu_io(&uri, &commands);
    assert_qemu_io_ok(&out, "qemu-io session");
    assert_eq!(
        out.stdout
            .lines()
            .filter(|l| l.starts_with("read "))
            .count(),
        reads,
        "every read reported\n{}",
        out.stdout
    );

    // What the first session wrote is there for a second session (another connection).
    let out = qemu_io(
        &uri,
        &["read -P 0xcd 1M 1M".into(), "read -P 0x21 12345 777".into()],
    );
    assert_qemu_io_ok(&out, "qemu-io second session");

    // Negative controls: a wrong pattern and a read past the end must fail.
    let out = qemu_io(&uri, &["read -P 0xee 0 4096".into()]);
    assert!(
        !out.status.success() && out.stdout.contains("Pattern verification failed"),
        "a wrong pattern is noticed\n{}{}",
        out.stdout,
        out.stderr
    );
    let out = qemu_io(&uri, &[format!("read {size} 512")]);
    assert!(
        !out.status.success() || out.stdout.contains("failed") || out.stderr.contains("failed"),
        "a read past the end fails\n{}{}",
        out.stdout,
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// fio

fn fio_random_write_verify(label: &str, iodepth: u32) {
    if !require_tool("fio") {
        return;
    }
    let dir = TempDir::new(label);
    let node = Node::start(&dir, "nas-a");
    let uri = node.nbd_uri();
    let json_path = dir.join("fio.json");
    let size_bytes: u64 = 32 * MIB as u64;
    let out = run_with_timeout(
        Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                &format!("--iodepth={iodepth}"),
                &format!("--size={size_bytes}"),
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
                &format!("--output={}", json_path.display()),
            ])
            .current_dir(dir.path()),
        Duration::from_secs(90),
    );
    out.assert_success("fio");
    let report: serde_json::Value =
        serde_json::from_slice(&read_file(&json_path)).unwrap_or_else(|e| panic!("fio json: {e}"));
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error: {job:#}");
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(size_bytes),
        "fio wrote the whole area"
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(size_bytes),
        "fio read back (verified) the whole area"
    );
    for text in [&out.stdout, &out.stderr] {
        assert!(
            !text.contains("verify") || !text.contains("fail"),
            "fio reported a verify failure:\n{text}"
        );
        assert!(!text.contains("bad magic"), "fio: {text}");
    }
}

#[test]
fn fio_random_writes_verify_at_iodepth_32() {
    fio_random_write_verify("fio32", 32);
}

#[test]
fn fio_random_writes_verify_at_iodepth_64() {
    fio_random_write_verify("fio64", 64);
}

// ---------------------------------------------------------------------------------------------
// libnbd: odd requests

#[test]
fn libnbd_odd_requests_get_the_answers_the_spec_and_contract_require() {
    if !require_python_nbd() {
        return;
    }
    let dir = TempDir::new("oddreq");
    let node = Node::start(&dir, "nas-a");
    let script = tandem_tests::workspace_root().join("tests/python/odd_requests.py");
    let out = run_with_timeout(
        Command::new(tandem_tests::SYSTEM_PYTHON)
            .arg(&script)
            .arg(node.nbd_uri()),
        Duration::from_secs(90),
    );
    assert!(
        out.status.success(),
        "odd_requests.py: {}\n--- stdout\n{}\n--- stderr\n{}\n--- node stderr\n{}",
        out.status,
        out.stdout,
        out.stderr,
        node.stderr_log()
    );
    assert!(
        out.stdout.contains("all expectations held"),
        "{}",
        out.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// Raw sockets: what real clients never send

fn assert_serves_a_read(client: &mut RawClient, what: &str) {
    match client.read(0, 4096) {
        Ok(Ok(data)) => assert_eq!(data.len(), 4096),
        Ok(Err(e)) => panic!("{what}: read failed with NBD error {e}"),
        Err(e) => panic!("{what}: read i/o error {e}"),
    }
}

#[test]
fn bad_request_magic_closes_that_connection_and_others_keep_working() {
    let dir = TempDir::new("badmagic");
    let node = Node::start(&dir, "nas-a");
    let (mut good, export) = RawClient::connect_and_go(node.nbd_socket());
    assert_ne!(export.flags & tflag::HAS_FLAGS, 0);
    let (mut bad, _) = RawClient::connect_and_go(node.nbd_socket());
    assert_serves_a_read(&mut bad, "before the bad magic");

    bad.send_request_with_magic(0xdead_beef, 0, cmd::READ, 99, 0, 4096)
        .expect("send bad magic");
    assert!(
        bad.wait_closed(Duration::from_secs(5)),
        "server keeps a connection open after a bad request magic"
    );
    assert_serves_a_read(&mut good, "other connection after the bad magic");
    let (mut fresh, _) = RawClient::connect_and_go(node.nbd_socket());
    assert_serves_a_read(&mut fresh, "new connection after the bad magic");
}

#[test]
fn garbage_during_the_handshake_closes_only_that_connection() {
    let dir = TempDir::new("garbage");
    let node = Node::start(&dir, "nas-a");
    let (mut good, _) = RawClient::connect_and_go(node.nbd_socket());

    // Unknown client flags: the server MUST drop the connection.
    let mut c = RawClient::connect(node.nbd_socket()).expect("connect");
    c.read_greeting().expect("greeting");
    c.send_client_flags(0xffff_fff0).expect("send flags");
    assert!(
        c.wait_closed(Duration::from_secs(5)),
        "unknown client flags did not close the connection"
    );

    // Garbage where an option header belongs.
    let mut c = RawClient::connect(node.nbd_socket()).expect("connect");
    c.handshake().expect("handshake");
    c.stream()
        .write_all(&pseudo_random_bytes(42, 256))
        .expect("send garbage");
    assert!(
        c.wait_closed(Duration::from_secs(5)),
        "garbage instead of an option did not close the connection"
    );

    // Garbage before even reading the greeting (e.g. an HTTP client on the wrong port).
    let mut c = RawClient::connect(node.nbd_socket()).expect("connect");
    c.stream()
        .write_all(b"GET / HTTP/1.1\r\nHost: nas\r\n\r\n")
        .expect("send http");
    assert!(
        c.wait_closed(Duration::from_secs(5)),
        "an HTTP request did not close the connection"
    );

    assert_serves_a_read(&mut good, "established connection after handshake garbage");
    let (mut fresh, _) = RawClient::connect_and_go(node.nbd_socket());
    assert_serves_a_read(&mut fresh, "new connection after handshake garbage");
}

#[test]
fn absurd_option_length_is_refused_without_the_server_growing() {
    let dir = TempDir::new("absurdopt");
    let node = Node::start(&dir, "nas-a");
    let (mut good, _) = RawClient::connect_and_go(node.nbd_socket());

    for option in [opt::GO, opt::EXPORT_NAME, 0x4242] {
        let mut c = RawClient::connect(node.nbd_socket()).expect("connect");
        c.handshake().expect("handshake");
        c.send_option_header(option, 0xffff_fff0)
            .expect("send header");
        // Feed a little of the claimed data; a server that tries to buffer 4 GiB would start
        // growing here.
        let _ = c.stream().write_all(&[0u8; 64 * 1024]);
        // Either an error reply or a close, promptly (the header alone shows the length is
        // impossible: option strings are at most 4096 bytes); never an ACK, never a wait for
        // 4 GiB or for a handshake timeout.
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("set timeout");
        let started = std::time::Instant::now();
        match c.read_option_reply() {
            Ok(reply) => assert!(
                reply.is_error(),
                "option {option:#x} with length 0xfffffff0 got a non-error reply {reply:?}"
            ),
            Err(e) => assert!(
                tandem_tests::is_disconnect(&e),
                "option {option:#x} with length 0xfffffff0: neither an error reply nor a close \
                 within {:?}: {e}",
                started.elapsed()
            ),
        }
        let rss_kib = node.rss_kib();
        assert!(
            rss_kib < 64 * 1024,
            "server RSS {rss_kib} KiB after an option claiming 4 GiB"
        );
    }
    assert_serves_a_read(&mut good, "other connection after absurd option lengths");
    let (mut fresh, _) = RawClient::connect_and_go(node.nbd_socket());
    assert_serves_a_read(&mut fresh, "new connection after absurd option lengths");
}

#[test]
fn unknown_option_gets_err_unsup_and_the_next_option_still_works() {
    let dir = TempDir::new("unknownopt");
    let node = Node::start(&dir, "nas-a");
    let mut c = RawClient::connect(node.nbd_socket()).expect("connect");
    c.handshake().expect("handshake");

    // An unknown option with data: the server must skip the data and parse the next option.
    c.send_option(0x1234, b"0123456789")
        .expect("send unknown option");
    let reply = c.read_option_reply().expect("reply to unknown option");
    assert_eq!(reply.option, 0x1234, "{reply:?}");
    assert_eq!(reply.reply_type, rep::ERR_UNSUP, "{reply:?}");

    // Extended headers are not implemented: ERR_UNSUP too, not a broken connection.
    c.send_option(11, b"").expect("send EXTENDED_HEADERS");
    let reply = c.read_option_reply().expect("reply to EXTENDED_HEADERS");
    assert!(reply.is_error(), "{reply:?}");

    let info = c
        .info("")
        .expect("INFO i/o")
        .unwrap_or_else(|r| panic!("INFO refused: {r:?}"));
    let export = c
        .go("")
        .expect("GO i/o")
        .unwrap_or_else(|r| panic!("GO refused after an unknown option: {r:?}"));
    assert_eq!(info, export, "INFO and GO describe the same export");
    assert_eq!(export.size, node.volume_bytes());
    let wanted = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_TRIM
        | tflag::SEND_WRITE_ZEROES
        | tflag::CAN_MULTI_CONN;
    assert_eq!(
        export.flags & wanted,
        wanted,
        "transmission flags {:#06x}",
        export.flags
    );
    assert_eq!(export.flags & tflag::READ_ONLY, 0);
    assert_serves_a_read(&mut c, "after the unknown option");
}

#[test]
fn list_and_abort_options_are_answered() {
    let dir = TempDir::new("listabort");
    let node = Node::start(&dir, "nas-a");
    let mut c = RawClient::connect(node.nbd_socket()).expect("connect");
    c.handshake().expect("handshake");
    c.send_option(opt::LIST, b"").expect("send LIST");
    let mut servers = 0;
    loop {
        let reply = c.read_option_reply().expect("LIST reply");
        assert_eq!(reply.option, opt::LIST);
        match reply.reply_type {
            rep::SERVER => servers += 1,
            rep::ACK => break,
            other => panic!("unexpected LIST reply {other:#x}"),
        }
    }
    assert!(servers >= 1, "LIST lists the export");
    c.send_option(opt::ABORT, b"").expect("send ABORT");
    match c.read_option_reply() {
        Ok(reply) => assert_eq!(reply.reply_type, rep::ACK, "ABORT answered {reply:?}"),
        Err(e) => assert!(tandem_tests::is_disconnect(&e), "ABORT: {e}"),
    }
    assert!(c.wait_closed(Duration::from_secs(5)), "ABORT closes");
}

#[test]
fn export_name_option_enters_transmission_and_unknown_name_closes() {
    let dir = TempDir::new("exportname");
    let node = Node::start(&dir, "nas-a");
    let size = node.volume_bytes();

    let mut c = RawClient::connect(node.nbd_socket()).expect("connect");
    let hs_flags = c.handshake().expect("handshake");
    c.send_option(opt::EXPORT_NAME, b"tandem")
        .expect("EXPORT_NAME");
    let zeroes = if hs_flags & tandem_tests::nbd_wire::FLAG_NO_ZEROES != 0 {
        0
    } else {
        124
    };
    let mut buf = vec![0u8; 10 + zeroes];
    std::io::Read::read_exact(c.stream(), &mut buf).expect("EXPORT_NAME reply");
    assert_eq!(u64::from_be_bytes(buf[0..8].try_into().expect("8")), size);
    let flags = u16::from_be_bytes([buf[8], buf[9]]);
    assert_ne!(flags & tflag::HAS_FLAGS, 0);
    assert_serves_a_read(&mut c, "EXPORT_NAME client");

    let mut c = RawClient::connect(node.nbd_socket()).expect("connect");
    c.handshake().expect("handshake");
    c.send_option(opt::EXPORT_NAME, b"no-such-export")
        .expect("EXPORT_NAME");
    assert!(
        c.wait_closed(Duration::from_secs(5)),
        "EXPORT_NAME of an unknown export must close the connection"
    );
}

#[test]
fn unknown_command_gets_einval_and_the_connection_survives() {
    let dir = TempDir::new("unknowncmd");
    let node = Node::start(&dir, "nas-a");
    let (mut c, _) = RawClient::connect_and_go(node.nbd_socket());
    for command in [0x42u16, 0xffff, 8 /* RESIZE, experimental */] {
        let error = c
            .command(0, command, 0, 4096)
            .expect("reply to unknown command");
        assert_eq!(
            error,
            errno::EINVAL,
            "command {command:#x} answered with NBD error {error}"
        );
        assert_serves_a_read(&mut c, "after an unknown command");
    }
    // BLOCK_STATUS without a negotiated meta context: SHOULD be EINVAL (proto.md).
    let error = c
        .command(0, cmd::BLOCK_STATUS, 0, 4096)
        .expect("reply to BLOCK_STATUS");
    assert_eq!(error, errno::EINVAL, "BLOCK_STATUS without a context");
    // An undefined flag bit on a write.
    let error = c.write(1 << 12, 0, &[7u8; 512]).expect("write reply");
    assert_eq!(error, errno::EINVAL, "write with undefined flag bit 12");
    // The simple-reply path of the contract's bounds rules.
    let size = node.volume_bytes();
    assert_eq!(c.read(size, 512).expect("read reply"), Err(errno::EINVAL));
    assert_eq!(
        c.write(0, size, &[1u8; 512]).expect("write reply"),
        errno::ENOSPC
    );
    assert_eq!(
        c.command(0, cmd::TRIM, size, 512).expect("trim reply"),
        errno::EINVAL
    );
    assert_eq!(
        c.command(0, cmd::WRITE_ZEROES, size, 512)
            .expect("zero reply"),
        errno::ENOSPC
    );
    assert_eq!(c.command(0, cmd::FLUSH, 0, 0).expect("flush reply"), 0);
    assert_eq!(
        c.write(cmd_flag::FUA, 0, &[9u8; 512]).expect("fua reply"),
        0
    );
    assert_eq!(c.read(0, 512).expect("read"), Ok(vec![9u8; 512]));
}

#[test]
fn oversized_write_is_refused_with_einval_and_its_payload_discarded() {
    let dir = TempDir::new("bigwrite");
    let node = Node::start(&dir, "nas-a");
    let (mut c, _) = RawClient::connect_and_go(node.nbd_socket());
    let payload = vec![0x5au8; PAYLOAD_BYTES_MAX as usize + 4096];
    match c.write(0, 0, &payload) {
        Ok(error) => {
            assert_eq!(error, errno::EINVAL, "write of 32 MiB + 4 KiB");
            // The payload was discarded, not parsed as requests: the connection still works and
            // nothing was written.
            assert_eq!(c.read(0, 4096).expect("read"), Ok(vec![0u8; 4096]));
        }
        Err(e) => panic!("write of 32 MiB + 4 KiB: expected EINVAL, got i/o error {e}"),
    }
    // Exactly the maximum payload is accepted.
    let payload = vec![0x6bu8; PAYLOAD_BYTES_MAX as usize];
    assert_eq!(c.write(0, 0, &payload).expect("write max"), 0);
    assert_eq!(
        c.read(PAYLOAD_BYTES_MAX as u64 - 4096, 4096).expect("read"),
        Ok(vec![0x6bu8; 4096])
    );
    assert!(
        node.rss_kib() < 256 * 1024,
        "server RSS {} KiB",
        node.rss_kib()
    );
}

#[test]
fn connections_past_the_limit_are_refused_at_go_while_the_first_64_serve() {
    let dir = TempDir::new("connlimit");
    let node = Node::start(&dir, "nas-a");
    let mut accepted = Vec::new();
    for i in 0..CONNECTIONS_MAX {
        let mut c =
            RawClient::connect(node.nbd_socket()).unwrap_or_else(|e| panic!("connect #{i}: {e}"));
        c.handshake()
            .unwrap_or_else(|e| panic!("handshake #{i}: {e}"));
        match c.go("").unwrap_or_else(|e| panic!("GO #{i}: {e}")) {
            Ok(_) => accepted.push(c),
            Err(reply) => panic!("connection #{i} (within the limit) refused: {reply:?}"),
        }
    }
    let mut refused = 0;
    for i in CONNECTIONS_MAX..70 {
        let mut c =
            RawClient::connect(node.nbd_socket()).unwrap_or_else(|e| panic!("connect #{i}: {e}"));
        let result = c.handshake().and_then(|_| c.go(""));
        match result {
            Ok(Err(reply)) => {
                assert_ne!(reply.reply_type & rep::ERROR_BIT, 0);
                refused += 1;
            }
            Ok(Ok(export)) => panic!("connection #{i} past the limit accepted: {export:?}"),
            Err(e) => panic!(
                "connection #{i} past the limit: expected an error reply to GO, got i/o error {e}"
            ),
        }
    }
    assert_eq!(refused, 70 - CONNECTIONS_MAX);
    for (i, c) in accepted.iter_mut().enumerate() {
        assert_serves_a_read(c, &format!("connection #{i} within the limit"));
    }
    // A slot freed by a disconnect is reusable.
    drop(accepted.pop());
    let reused = wait_until(Duration::from_secs(5), || {
        let Ok(mut c) = RawClient::connect(node.nbd_socket()) else {
            return false;
        };
        matches!(c.handshake().and_then(|_| c.go("")), Ok(Ok(_)))
    });
    assert!(reused, "a freed connection slot is not reused");
}

// ---------------------------------------------------------------------------------------------
// TCP listener

#[test]
fn tcp_listener_serves_the_same_volume() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = TempDir::new("tcp");
    let mut config = tandem_tests::NodeConfig::standalone(dir.path(), "nas-a");
    // A free port: bind to 0, read it, release it (racy only against other processes).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    config.nbd_listen = Some(format!("127.0.0.1:{port}"));
    create_sparse_file(&config.backing, tandem_tests::BACKING_BYTES_DEFAULT);
    let node = Node::spawn(config);
    let tcp_uri = format!("nbd://127.0.0.1:{port}/");
    assert!(
        wait_until(Duration::from_secs(5), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "TCP listener not accepting"
    );
    assert_eq!(nbdinfo_size(&tcp_uri), nbdinfo_size(&node.nbd_uri()));
}

#[test]
fn multi_conn_flush_and_fua_make_writes_visible_on_every_connection() {
    let dir = TempDir::new("multiconn");
    let node = Node::start(&dir, "nas-a");
    let (mut a, export) = RawClient::connect_and_go(node.nbd_socket());
    assert_ne!(export.flags & tflag::CAN_MULTI_CONN, 0);
    let (mut b, _) = RawClient::connect_and_go(node.nbd_socket());
    let (mut c, _) = RawClient::connect_and_go(node.nbd_socket());

    let one = pseudo_random_bytes(1, 128 * 1024);
    assert_eq!(a.write(0, 4096, &one).expect("write on a"), 0);
    assert_eq!(a.command(0, cmd::FLUSH, 0, 0).expect("flush on a"), 0);
    assert_eq!(
        b.read(4096, one.len() as u32).expect("read on b"),
        Ok(one.clone())
    );
    assert_eq!(c.read(4096, one.len() as u32).expect("read on c"), Ok(one));

    let two = pseudo_random_bytes(2, 64 * 1024);
    assert_eq!(
        b.write(cmd_flag::FUA, 1 << 20, &two)
            .expect("FUA write on b"),
        0
    );
    assert_eq!(
        a.read(1 << 20, two.len() as u32).expect("read on a"),
        Ok(two.clone())
    );
    assert_eq!(
        c.read(1 << 20, two.len() as u32).expect("read on c"),
        Ok(two)
    );
}

/// Back-pressure without lost wakeups, and fairness against clients that do not read their
/// replies (tests/python/backpressure.py says what each check is).
#[test]
fn queued_requests_complete_and_non_reading_clients_do_not_stall_others() {
    if !tandem_tests::require_python_nbd() {
        return;
    }
    let dir = TempDir::new("backpressure");
    let node = Node::start(&dir, "nas-bp");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/backpressure.py");
    let out = tandem_tests::run_with_timeout(
        std::process::Command::new(tandem_tests::SYSTEM_PYTHON).args([
            script,
            &node.nbd_socket().display().to_string(),
            &node.pid().to_string(),
        ]),
        std::time::Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "back-pressure checks failed:\n{}\n{}\n--- node\n{}",
        out.stdout,
        out.stderr,
        node.stderr_log()
    );
}
