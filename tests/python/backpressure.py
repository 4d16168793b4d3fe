"""Back-pressure and fairness against a running tandem node (run with /usr/bin/python3).

Usage: backpressure.py SOCKET_PATH SERVER_PID
Each check prints one line; the script exits 1 if any check failed.
  1. 64 x 1 MiB reads queued on one connection all complete (no lost wakeup when the buffer
     budget frees up by replies being written rather than by disk completions).
  2. two 32 MiB reads queued on one connection both complete.
  3. 300 x 4 KiB reads sent in one burst (past the per-connection limit of 256) all answered.
  4. a client that sends a 32 MiB read and never reads the reply does not stall another
     client's 4 KiB read.
  5. a client that floods LIST options and never reads the replies neither stalls another
     client nor grows the server's memory.
"""
import socket
import struct
import sys
import time

import nbd

SOCK = sys.argv[1]
PID = int(sys.argv[2])
URI = f"nbd+unix:///?socket={SOCK}"
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def rss_kib():
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_all(h, cookies, seconds):
    deadline = time.monotonic() + seconds
    done = set()
    while len(done) < len(cookies) and time.monotonic() < deadline:
        h.poll(100)
        for c in cookies:
            if c not in done and h.aio_command_completed(c):
                done.add(c)
    return len(done)


def queued_reads(count, size):
    h = nbd.NBD()
    h.connect_uri(URI)
    bufs = [nbd.Buffer(size) for _ in range(count)]
    cookies = [h.aio_pread(bufs[i], (i * size) % (h.get_size() - size)) for i in range(count)]
    done = wait_all(h, cookies, 30)
    h.shutdown()
    return done


def raw_handshake():
    """A fixed-newstyle handshake with NBD_OPT_GO on a raw socket; returns the socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(SOCK)
    greeting = recv_exact(s, 18)
    assert greeting[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
    payload = struct.pack(">I", 0) + struct.pack(">H", 0)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(payload)) + payload)
    while True:
        header = recv_exact(s, 20)
        _, _, reply_type, length = struct.unpack(">QIII", header)
        recv_exact(s, length)
        if reply_type == 1:  # ACK
            return s
        assert reply_type == 3, f"unexpected reply {reply_type:#x}"


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("server closed")
        data += chunk
    return data


def read_request(cookie, offset, length):
    return struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, offset, length)


def small_read_time():
    h = nbd.NBD()
    h.connect_uri(URI)
    start = time.monotonic()
    buf = nbd.Buffer(4096)
    cookie = h.aio_pread(buf, 0)
    done = wait_all(h, [cookie], 5)
    elapsed = time.monotonic() - start
    h.shutdown()
    return done == 1, elapsed


# 1 and 2: queued reads on one connection.
check(queued_reads(64, 1 << 20) == 64, "64 x 1 MiB reads on one connection complete")
check(queued_reads(2, 32 << 20) == 2, "2 x 32 MiB reads on one connection complete")

# 3: a burst past the per-connection limit.
s = raw_handshake()
s.sendall(b"".join(read_request(i, i * 4096, 4096) for i in range(300)))
answered = 0
try:
    while answered < 300:
        header = recv_exact(s, 16)
        magic, error, _cookie = struct.unpack(">IIQ", header)
        assert magic == 0x67446698 and error == 0
        recv_exact(s, 4096)
        answered += 1
except (socket.timeout, EOFError):
    pass
s.close()
check(answered == 300, f"300 reads in one burst answered ({answered})")

# 4: a slow reader holding a 32 MiB reply.
hog = raw_handshake()
hog.sendall(read_request(1, 0, 32 << 20))
time.sleep(0.5)
ok, elapsed = small_read_time()
check(ok and elapsed < 3, f"a 4 KiB read beside an unread 32 MiB reply ({elapsed:.2f} s)")
hog.close()

# 5: an option flood that is never read.
before = rss_kib()
flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
flood.connect(SOCK)
recv_exact(flood, 18)
flood.sendall(struct.pack(">I", 3))
flood.setblocking(False)
list_option = b"IHAVEOPT" + struct.pack(">II", 3, 0)
sent = 0
deadline = time.monotonic() + 5
while sent < 30000 and time.monotonic() < deadline:
    try:
        flood.send(list_option)
        sent += 1
    except BlockingIOError:
        time.sleep(0.01)
time.sleep(0.5)
ok, elapsed = small_read_time()
check(ok and elapsed < 3, f"a 4 KiB read beside an option flood of {sent} ({elapsed:.2f} s)")
grown = rss_kib() - before
check(grown < 32 * 1024, f"server memory grew {grown} KiB under the flood")
flood.close()

sys.exit(1 if failures else 0)
