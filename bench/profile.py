"""Where aimx's inbound CPU goes: py-spy on a loaded daemon, folded by function group.

Usage: ``python -m bench.profile [--seconds N] [--sessions N] [--size BYTES]
[--workers N] [--out stacks.txt]``. Starts the bench's aimx target, loads it with
``bench.loadgen`` (DKIM-signed messages, DKIM/SPF/DMARC against the bench DNS
server), samples every process of it with ``py-spy record --gil`` (only the thread
holding the GIL: Python's own CPU, not threads waiting in fsync or epoll) and
prints the share of samples, and the process time per message that share
stands for, by group of functions. Kernel time spent without the GIL (the
writes, fsyncs and socket calls themselves) is in the total, not in the groups.
Needs root (py-spy attaches with ptrace).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen, targets
from bench.run import sender_zone
from tests.support.dkimkeys import new_key
from tests.support.dnsserver import DnsServer

#: (group, substring of a frame "function (file:line)"); the first match from the
#: innermost frame outwards names the sample's group.
GROUPS = (
    ("logging", "logging/"), ("logging", "aimx/logs.py"),
    ("dkim verify", "aimx/smtp/emailauth.py:"), ("dkim verify", "dkim/"),
    ("spf/dmarc", "spf.py"), ("spf/dmarc", "authheaders"), ("spf/dmarc", "dnsresolve.py"),
    ("spf/dmarc", "publicsuffix"), ("spf/dmarc", "checkdmarc"),
    ("index", "aimx/storage/index.py"), ("index", "sqlite3"),
    ("dedup", "aimx/storage/dedup.py"),
    ("storage", "aimx/storage/"), ("storage", "aimx/fsutil.py"),
    ("frontmatter", "aimx/mail/frontmatter.py"), ("frontmatter", "aimx/tomltext.py"),
    ("frontmatter", "tomlkit/"),
    ("trust", "aimx/mail/trust.py"),
    ("parse/render", "aimx/mail/"), ("parse/render", "email/"),
    ("ingest", "aimx/smtp/ingest.py"),
    ("smtp session", "aimx/smtp/server.py"), ("smtp session", "twisted/mail/"),
    ("daemon", "aimx/daemon/"),
    ("threads", "threading.py"), ("threads", "twisted/python/threadpool"),
    ("threads", "twisted/_threads"), ("threads", "queue.py"),
    ("reactor/io", "twisted/"),
)


def group_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for group, needle in GROUPS:
            if needle in frame:
                return group
    return "other"


def fold(raw: str) -> collections.Counter[str]:
    """Sample counts per group from py-spy's ``raw`` (collapsed stacks) output."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[group_of(stack)] += int(count)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, help="keep the collapsed stacks here")
    args = parser.parse_args(argv)
    py_spy = Path(sys.executable).with_name("py-spy")
    key = new_key()
    with targets.run_directory(), DnsServer(sender_zone(key.txt_record)) as dns:
        pool = loadgen.signed_pool(key.private_pem, tag=f"p{int(time.time())}", size=args.size,
                                   count=int(args.seconds * 800), rcpt=targets.RCPT)
        target = targets.AimxTarget(dns.address, workers=args.workers)
        target.start()
        try:
            loadgen.warm_up(target.host, target.port, pool[:50], targets.RCPT)
            pids = target.pids()
            meter_before = targets.cpu_seconds(target.pids())
            with tempfile.TemporaryDirectory() as tmp:
                spies = [subprocess.Popen(
                    [str(py_spy), "record", "--pid", str(pid), "--rate", str(args.rate),
                     "--format", "raw", "--gil", "--nonblocking", "--duration",
                     str(int(args.seconds) + 2), "--output", f"{tmp}/{pid}.txt"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]
                time.sleep(1.0)
                result = loadgen.run_load(target.host, target.port, pool[50:],
                                          sessions=args.sessions, seconds=args.seconds,
                                          rcpt=targets.RCPT, size=args.size)
                cpu = targets.cpu_seconds(target.pids()) - meter_before
                for spy in spies:
                    spy.wait(60)
                raw = "".join(Path(tmp, name).read_text() for name in os.listdir(tmp))
        finally:
            target.stop()
    if args.out:
        args.out.write_text(raw)
    counts = fold(raw)
    total = sum(counts.values()) or 1
    per_message = cpu * 1000 / result.messages if result.messages else float("nan")
    print(f"{result.messages} messages at {result.rate:.0f}/s, p50 {result.p50:.1f} ms, "
          f"p99 {result.p99:.1f} ms; CPU {per_message:.2f} ms per message (user+system, "
          f"all processes); {total} samples")
    print("group            share   ≈ms/msg (share × the CPU per message)")
    for group, count in counts.most_common():
        print(f"{group:15s} {count / total:6.1%}   {per_message * count / total:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
