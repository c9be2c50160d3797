"""``make bench``: every figure of docs/performance.md, measured in one run.

Usage: ``python -m bench.run [--quick] [--seconds N] [--only inbound,source,send,listing,
memory,mcp] [--targets aimx,postfix,...] [--workers N] [--mailbox-size N] [--filesystem fresh|tmp]
[--json PATH]``.
Needs root for Postfix (installed with apt when missing) and for the mailbox
owner's files; without root the Postfix rows are skipped with a note. Prints
absolute numbers and the ratios the targets are stated in; the whole run takes
about a quarter of an hour on a 2-core machine, ``--quick`` five to eight minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pwd
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import listing, loadgen, memory, sending, smtpsource, targets
from tests.support.daemon import REPO_ROOT
from tests.support.dkimkeys import new_key
from tests.support.dnsserver import DnsServer
from tests.support.postfix import Postfix, SmtpSinkProgram, ensure_installed

SIZES = (4096, 102400)
SESSIONS = (1, 8)
TARGET_NAMES = ("aimx", "postfix", "twisted", "aiosmtpd", "smtp-sink")
#: What ``--quick`` keeps: aimx and what the targets are stated against.
QUICK_TARGETS = ("aimx", "postfix", "twisted")
#: The ``smtp-source`` run: the issue's figure (3,000 messages of 4 KB over 8 sessions).
SOURCE_MESSAGES, SOURCE_SIZE, SOURCE_SESSIONS = 3000, 4096, 8
SOURCE_TARGETS = ("aimx", "postfix", "twisted")


def log(text: str) -> None:
    print(text, flush=True)


def sender_zone(txt_record: str) -> dict[str, list[list[str]]]:
    """The bench sender's DNS: SPF for loopback, its DKIM key, a DMARC policy."""
    return {
        loadgen.SENDER_DOMAIN: [["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
        f"{loadgen.SELECTOR}._domainkey.{loadgen.SENDER_DOMAIN}": [["TXT", txt_record]],
        f"_dmarc.{loadgen.SENDER_DOMAIN}": [["TXT", "v=DMARC1; p=reject"]],
        **sending.partner_zone(),
    }


def make_target(name: str, dns_address: str, workers: int) -> Any:
    if name == "aimx":
        return targets.AimxTarget(dns_address, workers=workers)
    if name == "postfix":
        owner = pwd.getpwnam(targets.OWNER)
        return Postfix(domain=targets.DOMAIN, users=(targets.MAILBOX,), uid=owner.pw_uid,
                       gid=owner.pw_gid)
    if name == "twisted":
        return targets.BaselineTarget("twisted", "bench.baseline_twisted")
    if name == "aiosmtpd":
        return targets.BaselineTarget("aiosmtpd", "bench.baseline_aiosmtpd")
    return SmtpSinkProgram()


class CpuMeter:
    """CPU of a target's process trees between ``start()`` and ``stop()``, split into
    the first root process (aimx's main process) and everything else (its workers)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.main = self.rest = 0.0

    def _sample(self) -> tuple[float, float]:
        pids = self.target.pids()
        usage = targets.cpu_by_process(pids)
        main = usage.get(pids[0], 0.0) if pids else 0.0
        return main, sum(usage.values()) - main

    def start(self) -> None:
        self.main, self.rest = self._sample()

    def stop(self) -> None:
        main, rest = self._sample()
        self.main, self.rest = main - self.main, rest - self.rest

    def per_message(self, messages: int) -> dict[str, float]:
        if not messages:
            return {"cpu_ms_per_message": math.nan, "main_cpu_ms_per_message": math.nan,
                    "workers_cpu_ms_per_message": math.nan}
        return {"cpu_ms_per_message": (self.main + self.rest) * 1000 / messages,
                "main_cpu_ms_per_message": self.main * 1000 / messages,
                "workers_cpu_ms_per_message": self.rest * 1000 / messages}


def _stored_fields(target: Any, name: str, stored_before: int, messages: int,
                   wall_start: float) -> dict[str, Any]:
    """Messages on disk and the stored rate up to the moment the last one was there:
    Postfix answers 250 once the queue file is safe and delivers afterwards."""
    if name == "smtp-sink":
        return {}
    stored = targets.wait_stored(target, stored_before + messages) - stored_before
    last = target.last_store_time()
    row: dict[str, Any] = {"stored": stored,
                           "stored_rate": (stored / (last - wall_start)
                                           if last and last > wall_start else math.nan)}
    if name == "aimx":
        sample = target.sample_file()
        text = sample.read_text() if sample else ""
        row["auth"] = all(f'{key} = "pass"' in text for key in ("dkim", "spf", "dmarc"))
    return row


def _measure(name: str, dns_address: str, warm: list[bytes], workers: int,
             drive: Callable[[Any], tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """One target, fresh and warmed, loaded by ``drive(target)`` under the CPU meter.

    ``drive`` returns the row's own fields and how many messages it sent.
    """
    target = make_target(name, dns_address, workers)
    target.start()
    try:
        loadgen.warm_up(target.host, target.port, warm, targets.RCPT)
        stored_before = target.stored()
        meter = CpuMeter(target)
        meter.start()
        wall_start = time.time()
        fields, messages = drive(target)
        meter.stop()
        row = {**fields, **meter.per_message(messages)}
        row.update(_stored_fields(target, name, stored_before, messages, wall_start))
        return row
    finally:
        target.stop()


def run_inbound(name: str, dns_address: str, size: int, sessions: int,
                pool: list[bytes], warm: list[bytes], seconds: float, workers: int
                ) -> dict[str, Any]:
    """One target, fresh, for one (size, sessions) cell, driven by ``bench.loadgen``."""

    def drive(target: Any) -> tuple[dict[str, Any], int]:
        result = loadgen.run_load(target.host, target.port, pool, sessions=sessions,
                                  seconds=seconds, rcpt=targets.RCPT, size=size)
        return {
            "generator": "loadgen", "target": name, "size": size, "sessions": sessions,
            "messages": result.messages, "failures": result.failures,
            "first_failure": result.first_failure, "rate": result.rate,
            "p50_ms": result.p50, "p99_ms": result.p99,
            "generator_cpu_share": result.generator_cpu / result.seconds,
        }, result.messages

    return _measure(name, dns_address, warm, workers, drive)


def run_source(name: str, dns_address: str, message: Path, warm: list[bytes], messages: int,
               workers: int) -> dict[str, Any]:
    """One target, fresh, driven by ``smtp-source`` with ``messages`` copies of ``message``."""

    def drive(target: Any) -> tuple[dict[str, Any], int]:
        result = smtpsource.run(target.host, target.port, message, messages=messages,
                                sessions=SOURCE_SESSIONS, rcpt=targets.RCPT)
        return {
            "generator": "smtp-source", "target": name, "size": SOURCE_SIZE,
            "sessions": SOURCE_SESSIONS, "messages": messages, "rate": result.rate,
            "returncode": result.returncode,
            "failures": 0 if result.returncode == 0 else 1,
            "first_failure": "" if result.returncode == 0 else result.output[-300:],
        }, messages

    return _measure(name, dns_address, warm, workers, drive)


def _log_row(row: dict[str, Any]) -> None:
    latency = (f"p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
               if "p50_ms" in row else "")
    log(f"  {row['target']:9s} {row['size'] // 1024:4d} KB x{row['sessions']}: "
        f"{row['rate']:7.1f} msg/s  {latency}"
        f"stored/s {row.get('stored_rate', math.nan):7.1f}  "
        f"cpu {row['cpu_ms_per_message']:.2f} ms/msg"
        + (f" (main {row['main_cpu_ms_per_message']:.2f}, workers "
           f"{row['workers_cpu_ms_per_message']:.2f})" if row["target"] == "aimx" else "")
        + ("" if row.get("auth", True) else "  NOT dkim/spf/dmarc=pass")
        + (f"  FAILURES {row['failures']}: {row['first_failure']}" if row["failures"] else ""))


def inbound(dns_address: str, key_pem: bytes, seconds: float, names: tuple[str, ...],
            workers: int, pool_scale: float) -> list[dict[str, Any]]:
    rows = []
    for size in SIZES:
        count = int((8000 if size < 10000 else 3500) * pool_scale)
        started = time.monotonic()
        tag = f"r{int(time.time())}s{size}"
        pool = loadgen.signed_pool(key_pem, tag=tag, size=size, count=count, rcpt=targets.RCPT)
        warm = loadgen.signed_pool(key_pem, tag=tag + "w", size=size, count=20,
                                   rcpt=targets.RCPT, workers=1)
        log(f"  signed {count} messages of {len(pool[0])} bytes in "
            f"{time.monotonic() - started:.1f}s")
        for sessions in SESSIONS:
            for name in names:
                row = run_inbound(name, dns_address, size, sessions, pool, warm, seconds,
                                  workers)
                rows.append(row)
                _log_row(row)
    return rows


def source(dns_address: str, key_pem: bytes, names: tuple[str, ...], workers: int,
           messages: int) -> list[dict[str, Any]]:
    rows = []
    warm = loadgen.signed_pool(key_pem, tag=f"sw{int(time.time())}", size=SOURCE_SIZE,
                               count=20, rcpt=targets.RCPT, workers=1)
    with tempfile.TemporaryDirectory(prefix="aimx-bench-source-") as tmp:
        message = smtpsource.message_file(key_pem, SOURCE_SIZE, targets.RCPT,
                                          Path(tmp) / "message.eml")
        for name in names:
            row = run_source(name, dns_address, message, warm, messages, workers)
            rows.append(row)
            _log_row(row)
    return rows


def _cell(rows: list[dict[str, Any]], target: str, size: int, sessions: int
          ) -> dict[str, Any] | None:
    return next((r for r in rows if (r["target"], r["size"], r["sessions"])
                 == (target, size, sessions)), None)


def _rate(row: dict[str, Any]) -> float:
    """What a target sustained: the lower of its 250 rate and its stored rate."""
    stored = row.get("stored_rate", math.nan)
    return min(row["rate"], stored) if not math.isnan(stored) else row["rate"]


def inbound_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| size | sessions | target | msg/s | stored/s | p50 ms | p99 ms | CPU ms/msg "
             "| aimx ÷ this |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in SIZES:
        for sessions in SESSIONS:
            ours = _cell(rows, "aimx", size, sessions)
            for name in TARGET_NAMES:
                row = _cell(rows, name, size, sessions)
                if row is None:
                    continue
                ratio = (_rate(ours) / _rate(row)) if ours and _rate(row) else math.nan
                p50, p99 = (f"{row[key]:.1f}" if key in row else "—"
                            for key in ("p50_ms", "p99_ms"))
                lines.append(
                    f"| {size // 1024} KB | {sessions} | {name} | {row['rate']:.0f} | "
                    f"{row.get('stored_rate', math.nan):.0f} | {p50} | "
                    f"{p99} | {row['cpu_ms_per_message']:.2f} | "
                    f"{'—' if name == 'aimx' else f'{ratio:.2f}×'} |")
    return lines


def _cpu_in_workers(row: dict[str, Any]) -> tuple[float, str]:
    """CPU per message in the processes that run the SMTP sessions: the worker children
    when there are any, else the one process."""
    workers = row["workers_cpu_ms_per_message"]
    if workers > 0.05 * row["cpu_ms_per_message"]:
        return workers, (f"{workers:.2f} ms in the workers, {row['main_cpu_ms_per_message']:.2f}"
                         f" ms in the main process, {row['cpu_ms_per_message']:.2f} ms in all")
    return row["cpu_ms_per_message"], (f"{row['cpu_ms_per_message']:.2f} ms, one process "
                                       "(no SMTP workers)")


def verdicts(results: dict[str, Any]) -> list[str]:
    """The issue's targets, each with the figure measured in this run."""
    out = []
    for key, generator in (("inbound", "loadgen"), ("source", "smtp-source")):
        rows = results.get(key) or []
        ours = _cell(rows, "aimx", 4096, 8)
        if not ours:
            continue
        for name, limit, label in (("postfix", 1.2, "Postfix→Maildir"),
                                   ("twisted", 1.0, "bare Twisted baseline")):
            other = _cell(rows, name, 4096, 8)
            if other:
                out.append(_verdict(f"{generator}: 4 KB x8 vs {label}",
                                    _rate(ours) / _rate(other), limit,
                                    f"{_rate(ours):.0f} vs {_rate(other):.0f} msg/s stored"))
        if generator == "loadgen":
            out.append(_verdict("loadgen: p99 end-of-DATA → 250 at 4 KB x8", ours["p99_ms"],
                                25.0, f"{ours['p99_ms']:.1f} ms", lower_is_better=True))
            single = _cell(rows, "aimx", 4096, 1)
            if single:
                out.append(_verdict("loadgen: p50 end-of-DATA → 250 at 4 KB x1",
                                    single["p50_ms"], 4.0, f"{single['p50_ms']:.1f} ms",
                                    lower_is_better=True))
        cpu, detail = _cpu_in_workers(ours)
        out.append(_verdict(f"{generator}: CPU per DKIM-signed 4 KB message (x8)", cpu, 2.0,
                            detail, lower_is_better=True))
        if not ours.get("auth", True):
            out.append(f"  [MISS] {generator}: stored aimx file does not say "
                       "dkim = spf = dmarc = \"pass\"")
    send = results.get("send")
    if send:
        out.append(_verdict("aimx send vs smtplib script", send["ratio"], 2.0,
                            f"{send['aimx_median_ms']:.0f} vs {send['smtplib_median_ms']:.0f} ms",
                            lower_is_better=True))
    lst = results.get("listing")
    if lst:
        out.append(_verdict(f"mailbox_list at {lst['messages']:,}", lst["mailbox_list_ms"], 50.0,
                            f"{lst['mailbox_list_ms']:.1f} ms", lower_is_better=True))
        first = lst["restart_mailbox_list_ms"] + lst["restart_page_ms"]
        out.append(_verdict(f"first email_list after a restart at {lst['messages']:,}",
                            first / 1000, 1.0,
                            f"MAILBOX-LIST {lst['restart_mailbox_list_ms']:.0f} ms + page "
                            f"{lst['restart_page_ms']:.0f} ms", lower_is_better=True))
        worst = max(c["index_ms"] for c in lst["cases"])
        out.append(_verdict(f"email_list page (index) at {lst['messages']:,}", worst, 50.0,
                            f"slowest case {worst:.1f} ms", lower_is_better=True))
        worst_mcp = max(c["mcp_cold_ms"] for c in lst["cases"])
        out.append(_verdict(f"email_list page (today's aimx mcp code) at {lst['messages']:,}",
                            worst_mcp, 50.0, f"slowest case {worst_mcp:.1f} ms",
                            lower_is_better=True))
    mem = results.get("memory")
    if mem:
        out.append(_verdict("peak RSS growth, one 25 MB message (× its size)",
                            mem["growth_ratio"], 2.0,
                            f"peak {mem['peak_kib'] / 1024:.0f} MB, "
                            f"{mem['before_big_kib'] / 1024:.0f} MB before",
                            lower_is_better=True))
        out.append(_verdict(f"peak RSS, {mem['concurrent']} concurrent 25 MB messages (MB)",
                            mem["concurrent_peak_kib"] / 1024, 1024.0,
                            f"{mem['concurrent_stored']}/{mem['concurrent']} stored, idle "
                            f"{mem['concurrent_idle_kib'] / 1024:.0f} MB",
                            lower_is_better=True))
        per_process = mem["idle_kib"] / 1024 / max(1, mem["processes"])
        out.append(_verdict("idle RSS per service process", per_process, 60.0,
                            f"{per_process:.1f} MB on average over {mem['processes']} "
                            f"processes, {mem['idle_kib'] / 1024:.1f} MB in all",
                            lower_is_better=True))
    return out


def _verdict(label: str, value: float, limit: float, detail: str,
             lower_is_better: bool = False) -> str:
    met = value <= limit if lower_is_better else value >= limit
    bound = f"≤ {limit:g}" if lower_is_better else f"≥ {limit:g}"
    shown = f"{value:.2f}" if not lower_is_better or limit < 10 else f"{value:.1f}"
    return f"  [{'met ' if met else 'MISS'}] {label}: {shown} (target {bound}) — {detail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 3 s cells, aimx/postfix/twisted only, smaller "
                             "pools, 1,000 smtp-source messages, a 10,000-message mailbox")
    parser.add_argument("--seconds", type=float, default=None,
                        help="length of each inbound run (default 8, 3 with --quick)")
    parser.add_argument("--only", default="inbound,source,send,listing,memory,mcp",
                        help="comma-separated parts to run")
    parser.add_argument("--targets", default=None,
                        help=f"comma-separated inbound targets (default {','.join(TARGET_NAMES)}"
                             f"; {','.join(QUICK_TARGETS)} with --quick)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="aimx smtp_workers, when this aimx has the setting (default: "
                             "the CPU count)")
    parser.add_argument("--source-messages", type=int, default=None,
                        help=f"messages smtp-source sends per target (default {SOURCE_MESSAGES}"
                             ", 1000 with --quick)")
    parser.add_argument("--mailbox-size", type=int, default=None,
                        help="messages in the listing mailbox (default 100,000, 10,000 with "
                             "--quick)")
    parser.add_argument("--filesystem", choices=("fresh", "tmp"), default="fresh",
                        help="where the targets keep their files: a new ext4 image made for "
                             "the run (default; needs root and a loop device, else falls back)"
                             " or the system temp directory")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    args = parser.parse_args(argv)
    with targets.run_directory(args.filesystem == "fresh") as (directory, where):
        log(f"every target keeps its files under {directory}, on {where}")
        return run(args, where)


def run(args: argparse.Namespace, where: str) -> int:
    """Every part ``args`` asks for, printed as it goes; the tables and verdicts at the end."""
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    mailbox_size = args.mailbox_size or (10_000 if args.quick else 100_000)
    source_messages = args.source_messages or (1000 if args.quick else SOURCE_MESSAGES)
    names = tuple(args.targets.split(",")) if args.targets else (
        QUICK_TARGETS if args.quick else TARGET_NAMES)
    parts = set(args.only.split(","))
    if os.geteuid() != 0:
        log("warning: not root; Postfix rows are skipped and file ownership is not exercised")
    started = time.monotonic()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                           "load_before": os.getloadavg(),
                                           "filesystem": where},
                               "aimx_config": {k: v for k, v in targets.aimx_config(
                                   "127.0.0.1", args.workers).items() if k == "smtp_workers"}}
    log(f"aimx smtp_workers: {results['aimx_config'].get('smtp_workers', 'one per CPU')}")
    key = new_key()
    with DnsServer(sender_zone(key.txt_record)) as dns:
        if parts & {"inbound", "source"}:
            skip = ensure_installed("postfix")
            if skip:
                log(f"note: Postfix rows and smtp-source skipped: {skip}")
                results["postfix_skipped"] = skip
                names = tuple(n for n in names if n not in ("postfix", "smtp-sink"))
        if "inbound" in parts:
            log("inbound, bench/loadgen.py (each target started fresh per cell, same signed "
                "messages):")
            results["inbound"] = inbound(dns.address, key.private_pem, seconds, names,
                                         args.workers, 0.4 if args.quick else 1.0)
        if "source" in parts and not results.get("postfix_skipped"):
            log(f"inbound, smtp-source ({source_messages} signed 4 KB messages over "
                f"{SOURCE_SESSIONS} sessions, each target started fresh):")
            results["source"] = source(dns.address, key.private_pem,
                                       tuple(n for n in SOURCE_TARGETS if n in names),
                                       args.workers, source_messages)
        if "send" in parts:
            log("aimx send vs a bare smtplib script (fresh process per message):")
            send = sending.measure(dns.address)
            results["send"] = {
                "aimx_median_ms": send.aimx_median, "smtplib_median_ms": send.smtplib_median,
                "ratio": send.ratio,
                "daemon_roundtrip_median_ms": statistics.median(send.roundtrip_ms),
                "cli_startup_median_ms": statistics.median(send.startup_ms),
            }
            log(f"  aimx send {send.aimx_median:.0f} ms, smtplib {send.smtplib_median:.0f} ms "
                f"({send.ratio:.2f}×); of which CLI start-up "
                f"{results['send']['cli_startup_median_ms']:.0f} ms, daemon SEND round trip "
                f"{results['send']['daemon_roundtrip_median_ms']:.0f} ms")
        if "memory" in parts:
            log("memory:")
            small = loadgen.signed_pool(key.private_pem, tag=f"m{int(time.time())}", size=4096,
                                        count=1, rcpt=targets.RCPT, workers=1)[0]
            mem = memory.measure(dns.address, key.private_pem, small)
            results["memory"] = {"idle_kib": mem.idle_kib, "warm_kib": mem.warm_kib,
                                 "peak_kib": mem.peak_kib, "before_big_kib": mem.before_big_kib,
                                 "after_big_kib": mem.after_big_kib,
                                 "message_bytes": mem.message_bytes,
                                 "peak_ratio": mem.peak_ratio, "growth_ratio": mem.growth_ratio,
                                 "concurrent": mem.concurrent,
                                 "concurrent_stored": mem.concurrent_stored,
                                 "concurrent_idle_kib": mem.concurrent_idle_kib,
                                 "concurrent_peak_kib": mem.concurrent_peak_kib,
                                 "processes": mem.processes}
            log(f"  idle {mem.idle_kib / 1024:.1f} MB, after one message "
                f"{mem.warm_kib / 1024:.1f} MB; 25 MB message: peak {mem.peak_kib / 1024:.1f} MB "
                f"({mem.peak_ratio:.1f}× the message, growth {mem.growth_ratio:.1f}×), "
                f"after {mem.after_big_kib / 1024:.1f} MB")
            log(f"  {mem.concurrent} concurrent 25 MB messages: peak "
                f"{mem.concurrent_peak_kib / 1024:.0f} MB over all processes (idle "
                f"{mem.concurrent_idle_kib / 1024:.0f} MB), {mem.concurrent_stored} stored")
    if "listing" in parts:
        log(f"listing a mailbox of {mailbox_size:,} messages:")
        lst = listing.measure(mailbox_size)
        results["listing"] = {
            "messages": lst.messages, "populate_s": lst.populate_s,
            "index_build_ms": lst.index_build_ms, "mailbox_list_ms": lst.mailbox_list_ms,
            "mailbox_list_scan_ms": lst.mailbox_list_scan_ms,
            "restart_mailbox_list_ms": lst.restart_mailbox_list_ms,
            "restart_page_ms": lst.restart_page_ms,
            "restart_stored_ms": lst.restart_stored_ms,
            "restart_stored_read": lst.restart_stored_read,
            "restart_changed_ms": lst.restart_changed_ms,
            "cases": [{"name": c.name, "mcp_cold_ms": c.mcp_cold_ms, "mcp_warm_ms": c.mcp_warm_ms,
                       "index_ms": c.index_ms, "rows": c.rows, "identical": c.identical}
                      for c in lst.cases]}
        log(f"  index built on first MAILBOX-LIST in {lst.index_build_ms / 1000:.1f} s; "
            f"MAILBOX-LIST {lst.mailbox_list_ms:.1f} ms (counting by reading every file: "
            f"{lst.mailbox_list_scan_ms:.0f} ms)")
        log(f"  after a daemon restart: first MAILBOX-LIST {lst.restart_mailbox_list_ms:.1f} ms, "
            f"first page {lst.restart_page_ms:.1f} ms; after the daemon stored "
            f"{listing.CHANGED_WHILE_DOWN:,} more: {lst.restart_stored_ms:.0f} ms "
            f"({lst.restart_stored_read} files read); with "
            f"{listing.CHANGED_WHILE_DOWN:,} files written behind its back while down: "
            f"{lst.restart_changed_ms:.0f} ms")
        for c in lst.cases:
            log(f"  {c.name:42s} index {c.index_ms:6.1f} ms | aimx mcp today cold "
                f"{c.mcp_cold_ms:7.1f} ms warm {c.mcp_warm_ms:7.1f} ms | {c.rows} rows"
                f"{'' if c.identical else '  ROWS DIFFER'}")
    if "mcp" in parts:
        log(f"email_list through a real aimx mcp process ({mailbox_size:,} messages; "
            "bench/email_list.py, today's listing code):")
        done = subprocess.run(
            [sys.executable, "bench/email_list.py", "--messages", str(mailbox_size),
             "--rounds", "5"], cwd=str(REPO_ROOT), capture_output=True, text=True,
            timeout=1200, check=False)
        results["mcp_email_list"] = done.stdout
        for line in (done.stdout + (done.stderr if done.returncode else "")).splitlines():
            log(f"  {line}")
    for key, title in (("inbound", "bench/loadgen.py"), ("source", "smtp-source")):
        if results.get(key):
            log("")
            log(f"{title}:")
            for line in inbound_table(results[key]):
                log(line)
    log("")
    log("targets:")
    for line in verdicts(results):
        log(line)
    results["machine"]["load_after"] = os.getloadavg()
    results["seconds"] = time.monotonic() - started
    log(f"\nbench finished in {results['seconds'] / 60:.1f} min "
        f"(load average before {results['machine']['load_before'][0]:.2f}, "
        f"after {results['machine']['load_after'][0]:.2f})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
