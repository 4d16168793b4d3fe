#!/usr/bin/python3
"""Odd but legal (or deliberately illegal) NBD requests against a tandem export, through libnbd.

Usage: /usr/bin/python3 odd_requests.py URI

Run by tests/tests/nbd_interop.rs against a fresh standalone node. Every expectation is checked;
the script prints one line per failure and exits 1 if any failed (2 on a usage error). libnbd's
strict mode is switched off where a request must reach the server instead of being refused by
libnbd itself.

Expectations come from the NBD protocol (doc/proto.md) and the contract of tandem's server:
reads/trims/block-status past the end -> EINVAL, writes/write-zeroes past the end -> ENOSPC,
unknown or unadvertised flags -> EINVAL, zero-length requests -> unspecified but no disconnect,
FUA accepted on any command once SEND_FUA is advertised, DISC completes outstanding requests.
"""

import errno
import sys

import nbd

FAILURES = []
MiB = 1024 * 1024


def fail(what):
    FAILURES.append(what)
    print("FAIL: " + what, flush=True)


def check(cond, what):
    if not cond:
        fail(what)


def expect_error(fn, errnums, what):
    """fn() must raise nbd.Error with an errnum in errnums."""
    try:
        fn()
    except nbd.Error as e:
        check(e.errnum in errnums,
              "%s: errno %s (%s), expected one of %s" % (what, e.errnum, e, errnums))
        return
    fail("%s: succeeded, expected an error in %s" % (what, errnums))


def attempt(fn, what):
    """fn() must succeed; returns its result or None."""
    try:
        return fn()
    except nbd.Error as e:
        fail("%s: %s (errno %s)" % (what, e, e.errnum))
        return None


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def still_serving(h, what):
    """The connection still works after an odd request."""
    attempt(lambda: h.pread(512, 0), "%s: a read afterwards on the same connection" % what)


def pattern(seed, n):
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


def extents(h, count, offset, flags=0):
    """block_status as a list of (length, flags) for base:allocation."""
    found = []

    def cb(metacontext, off, entries, err):
        if metacontext == "base:allocation":
            check(off == offset, "block_status callback offset %d != %d" % (off, offset))
            found.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(count, offset, cb, flags)
    return found


def test_negotiated(h):
    check(h.get_structured_replies_negotiated(), "structured replies negotiated")
    check(h.can_meta_context("base:allocation"), "base:allocation negotiated")
    for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        check(getattr(h, name)(), "%s advertised" % name)
    check(not h.is_read_only(), "export is writable")


def test_unaligned(h):
    h.pwrite(b"\x55" * 8192, 0)
    attempt(lambda: h.pwrite(b"xyz", 1), "write 3 bytes at offset 1")
    got = attempt(lambda: h.pread(3, 1), "read 3 bytes at offset 1")
    check(got == b"xyz", "read 3 at 1 returned %r" % (got,))
    got = attempt(lambda: h.pread(8, 0), "read 8 at 0")
    check(got == b"\x55xyz\x55\x55\x55\x55", "neighbours of the 3-byte write: %r" % (got,))
    data = pattern(3, 5001)
    attempt(lambda: h.pwrite(data, 4093), "write 5001 bytes at 4093 (across two 4K blocks)")
    got = attempt(lambda: h.pread(5001, 4093), "read 5001 at 4093")
    check(got == data, "unaligned 5001-byte write reads back")
    got = attempt(lambda: h.pread(8192, 0), "read 8K at 0")
    if got is not None:
        check(got[:4] == b"\x55xyz" and got[4:4093] == b"\x55" * 4089 and
              got[4093:] == data[:8192 - 4093],
              "unaligned write did not disturb its neighbours")


def test_zero_length(h):
    # The spec leaves zero-length requests unspecified but says the server SHOULD NOT
    # disconnect: success or an error are both fine, the connection must survive.
    h.set_strict_mode(0)
    for what, fn, errs in (
            ("zero-length read", lambda: h.pread(0, 4096), [errno.EINVAL]),
            ("zero-length write", lambda: h.pwrite(b"", 4096), [errno.EINVAL, errno.ENOSPC]),
            ("zero-length trim", lambda: h.trim(0, 4096), [errno.EINVAL]),
            ("zero-length write-zeroes", lambda: h.zero(0, 4096), [errno.EINVAL, errno.ENOSPC])):
        try:
            fn()
        except nbd.Error as e:
            check(e.errnum in errs, "%s failed with errno %s (%s), expected success or one of %s"
                  % (what, e.errnum, e, errs))
        still_serving(h, what)
    h.set_strict_mode(nbd.STRICT_MASK)


def test_past_end(h):
    size = h.get_size()
    h.set_strict_mode(0)
    tail = pattern(9, 512)
    attempt(lambda: h.pwrite(tail, size - 512), "write the last 512 bytes")
    got = attempt(lambda: h.pread(512, size - 512), "read the last 512 bytes")
    check(got == tail, "last 512 bytes read back")

    cases = [
        ("read at the end", lambda: h.pread(512, size), [errno.EINVAL]),
        ("read straddling the end", lambda: h.pread(1024, size - 512), [errno.EINVAL]),
        ("read at offset 2^63", lambda: h.pread(512, 1 << 63), [errno.EINVAL]),
        ("read whose end overflows u64", lambda: h.pread(4096, (1 << 64) - 512), [errno.EINVAL]),
        ("write at the end", lambda: h.pwrite(b"\xee" * 512, size), [errno.ENOSPC]),
        ("write straddling the end", lambda: h.pwrite(b"\xee" * 1024, size - 512), [errno.ENOSPC]),
        ("write whose end overflows u64", lambda: h.pwrite(b"\xee" * 4096, (1 << 64) - 512),
         [errno.ENOSPC, errno.EINVAL]),
        ("trim at the end", lambda: h.trim(512, size), [errno.EINVAL]),
        ("trim straddling the end", lambda: h.trim(1024, size - 512), [errno.EINVAL]),
        ("write-zeroes at the end", lambda: h.zero(512, size), [errno.ENOSPC]),
        ("write-zeroes straddling the end", lambda: h.zero(1024, size - 512), [errno.ENOSPC]),
        ("block-status at the end", lambda: extents(h, 512, size), [errno.EINVAL]),
    ]
    for what, fn, errs in cases:
        expect_error(fn, errs, what)
        still_serving(h, what)
    got = attempt(lambda: h.pread(512, size - 512), "read the last 512 bytes again")
    check(got == tail, "refused out-of-bounds writes left the last 512 bytes unchanged")
    # In bounds and ending exactly at the end is fine.
    attempt(lambda: h.zero(512, size - 512), "write-zeroes ending exactly at the end")
    attempt(lambda: h.trim(512, size - 512), "trim ending exactly at the end")
    h.set_strict_mode(nbd.STRICT_MASK)


def test_flags(h):
    h.set_strict_mode(0)
    base = 1 * MiB
    data = pattern(5, 4096)
    h.pwrite(data, base)
    # FUA may be set on any command once SEND_FUA is advertised (proto.md, command flags).
    got = attempt(lambda: h.pread(4096, base, nbd.CMD_FLAG_FUA), "read with FUA")
    check(got == data, "read with FUA returns the data")
    attempt(lambda: h.flush(nbd.CMD_FLAG_FUA), "flush with FUA")
    attempt(lambda: h.pwrite(data, base, nbd.CMD_FLAG_FUA), "write with FUA")
    attempt(lambda: h.zero(4096, base + 4096, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA),
            "write-zeroes with NO_HOLE|FUA")
    got = attempt(lambda: h.pread(4096, base + 4096), "read the NO_HOLE zeroes")
    check(got == b"\0" * 4096, "write-zeroes with NO_HOLE reads back as zeroes")

    # Flags the server did not advertise, and a flag bit no one defines.
    if not h.can_df():
        expect_error(lambda: h.pread(4096, base, nbd.CMD_FLAG_DF), [errno.EINVAL],
                     "read with DF although SEND_DF was not advertised")
        still_serving(h, "DF")
    if not h.can_fast_zero():
        expect_error(lambda: h.zero(4096, base, nbd.CMD_FLAG_FAST_ZERO),
                     [errno.EINVAL, errno.ENOTSUP],
                     "write-zeroes with FAST_ZERO although SEND_FAST_ZERO was not advertised")
        still_serving(h, "FAST_ZERO")
    expect_error(lambda: h.pwrite(b"\xdd" * 4096, base, 1 << 10), [errno.EINVAL],
                 "write with undefined command flag bit 10")
    still_serving(h, "undefined flag")
    got = attempt(lambda: h.pread(4096, base), "read after refused flags")
    check(got == data, "requests refused for their flags did not change the data")
    h.set_strict_mode(nbd.STRICT_MASK)


def test_block_status(h):
    size = h.get_size()
    h.pwrite(pattern(7, MiB), 8 * MiB)
    h.flush()
    ext = attempt(lambda: extents(h, 4 * MiB, 8 * MiB), "block_status over written data")
    if ext:
        check(all(length > 0 for length, _ in ext), "every extent has a length: %r" % ext)
        check(ext[0][1] & nbd.STATE_HOLE == 0,
              "written region reported as data, got flags %d" % ext[0][1])
    ext = attempt(lambda: extents(h, 4 * MiB, 8 * MiB, nbd.CMD_FLAG_REQ_ONE),
                  "block_status with REQ_ONE")
    if ext is not None:
        check(len(ext) == 1, "REQ_ONE gives exactly one extent, got %r" % ext)
        if ext:
            check(0 < ext[0][0] <= 4 * MiB, "REQ_ONE extent within the request: %r" % ext)
            check(ext[0][1] & nbd.STATE_HOLE == 0, "REQ_ONE extent is data: %r" % ext)
    middle = (size // 2) & ~(MiB - 1)
    ext = attempt(lambda: extents(h, MiB, middle, nbd.CMD_FLAG_REQ_ONE),
                  "block_status over a never-written region")
    if ext:
        check(ext[0][1] & nbd.STATE_HOLE != 0,
              "never-written region of a sparse backing is a hole, got %r" % ext)
        check(ext[0][1] & nbd.STATE_ZERO != 0,
              "never-written region of a sparse backing reads as zero, got %r" % ext)
    got = attempt(lambda: h.pread(4096, middle), "read a never-written region")
    check(got == b"\0" * 4096, "a never-written region reads as zeroes")


def test_many_in_flight(h):
    n = 128
    chunk = 64 * 1024
    base = 16 * MiB
    datas = [pattern(i, chunk) for i in range(n)]
    cookies = [h.aio_pwrite(datas[i], base + i * chunk) for i in range(n)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, c in enumerate(cookies):
        try:
            check(h.aio_command_completed(c), "aio write %d completed" % i)
        except nbd.Error as e:
            fail("aio write %d: %s" % (i, e))
    bufs = [nbd.Buffer(chunk) for _ in range(n)]
    cookies = [h.aio_pread(bufs[i], base + i * chunk) for i in range(n)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, c in enumerate(cookies):
        try:
            check(h.aio_command_completed(c), "aio read %d completed" % i)
        except nbd.Error as e:
            fail("aio read %d: %s" % (i, e))
            continue
        check(bufs[i].to_bytearray() == datas[i], "aio read %d returns what aio write %d wrote" % (i, i))


def test_disconnect(uri):
    h = connect(uri)
    n = 32
    chunk = 4096
    base = 40 * MiB
    for i in range(n):
        h.aio_pwrite(pattern(100 + i, chunk), base + i * chunk)
    # NBD_CMD_DISC: the server MUST handle all outstanding requests before it closes.
    h.shutdown()
    expect_error(lambda: h.pread(512, 0), [errno.ENOTCONN, errno.EINVAL, errno.ESHUTDOWN],
                 "a request after shutdown() fails cleanly")
    del h
    h2 = connect(uri)
    for i in range(n):
        got = h2.pread(chunk, base + i * chunk)
        check(got == pattern(100 + i, chunk),
              "write %d sent before NBD_CMD_DISC was carried out" % i)
    h2.shutdown()


def main():
    if len(sys.argv) != 2:
        print("usage: odd_requests.py URI", file=sys.stderr)
        return 2
    uri = sys.argv[1]
    h = connect(uri)
    for test in (test_negotiated, test_unaligned, test_zero_length, test_past_end,
                 test_flags, test_block_status, test_many_in_flight):
        try:
            test(h)
        except nbd.Error as e:
            fail("%s: unexpected libnbd error %s (errno %s)" % (test.__name__, e, e.errnum))
        if h.aio_is_closed() or h.aio_is_dead():
            fail("%s: the server closed the connection" % test.__name__)
            del h
            h = connect(uri)
        print("done: %s" % test.__name__, flush=True)
    h.shutdown()
    try:
        test_disconnect(uri)
    except nbd.Error as e:
        fail("test_disconnect: unexpected libnbd error %s (errno %s)" % (e, e.errnum))
    print("done: test_disconnect", flush=True)
    if FAILURES:
        print("%d expectation(s) failed" % len(FAILURES), flush=True)
        return 1
    print("all expectations held", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
