"""``make bench``: every figure of docs/performance.md, measured in one run.

Usage: ``python -m bench.run [--seconds N] [--only inbound,send,listing,memory,mcp]
[--mailbox-size N] [--json PATH]``. Needs root for Postfix (installed with apt
when missing) and for the mailbox owner's files; without root the Postfix rows
are skipped with a note. Prints absolute numbers and the ratios the targets are
stated in; the whole run takes about ten minutes on a 2-core machine.
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
import time
from typing import Any

from bench import listing, loadgen, memory, sending, targets
from tests.support.daemon import REPO_ROOT
from tests.support.dkimkeys import new_key
from tests.support.dnsserver import DnsServer
from tests.support.postfix import Postfix, SmtpSinkProgram, ensure_installed

SIZES = (4096, 102400)
SESSIONS = (1, 8)
TARGET_NAMES = ("aimx", "postfix", "aiosmtpd", "smtp-sink")


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


def make_target(name: str, dns_address: str) -> Any:
    if name == "aimx":
        return targets.AimxTarget(dns_address)
    if name == "postfix":
        owner = pwd.getpwnam(targets.OWNER)
        return Postfix(domain=targets.DOMAIN, users=(targets.MAILBOX,), uid=owner.pw_uid,
                       gid=owner.pw_gid)
    if name == "aiosmtpd":
        return targets.BaselineTarget()
    return SmtpSinkProgram()


def run_inbound(name: str, dns_address: str, size: int, sessions: int,
                pool: list[bytes], warm: list[bytes], seconds: float) -> dict[str, Any]:
    """One target, fresh, for one (size, sessions) cell."""
    target = make_target(name, dns_address)
    target.start()
    try:
        loadgen.warm_up(target.host, target.port, warm, targets.RCPT)
        stored_before = target.stored()
        cpu_before = targets.cpu_seconds(target.pids())
        wall_start = time.time()
        result = loadgen.run_load(target.host, target.port, pool, sessions=sessions,
                                  seconds=seconds, rcpt=targets.RCPT, size=size)
        cpu = targets.cpu_seconds(target.pids()) - cpu_before
        row: dict[str, Any] = {
            "target": name, "size": size, "sessions": sessions, "messages": result.messages,
            "failures": result.failures, "first_failure": result.first_failure,
            "rate": result.rate, "p50_ms": result.p50, "p99_ms": result.p99,
            "generator_cpu_share": result.generator_cpu / result.seconds,
            "cpu_ms_per_message": cpu * 1000 / result.messages if result.messages else math.nan,
        }
        if name != "smtp-sink":
            # Stored messages per second, up to the moment the last one was on disk:
            # Postfix answers 250 once the queue file is safe and delivers afterwards.
            expected = stored_before + result.messages
            stored = targets.wait_stored(target, expected)
            last = target.last_store_time()
            row["stored"] = stored - stored_before
            row["stored_rate"] = (row["stored"] / (last - wall_start)
                                  if last and last > wall_start else math.nan)
        if name == "aimx":
            sample = target.sample_file()
            text = sample.read_text() if sample else ""
            row["auth"] = all(f'{key} = "pass"' in text for key in ("dkim", "spf", "dmarc"))
        return row
    finally:
        target.stop()


def inbound(dns_address: str, key_pem: bytes, seconds: float, have_postfix: bool
            ) -> list[dict[str, Any]]:
    rows = []
    for size in SIZES:
        count = 8000 if size < 10000 else 3500
        started = time.monotonic()
        tag = f"r{int(time.time())}s{size}"
        pool = loadgen.signed_pool(key_pem, tag=tag, size=size, count=count, rcpt=targets.RCPT)
        warm = loadgen.signed_pool(key_pem, tag=tag + "w", size=size, count=20,
                                   rcpt=targets.RCPT, workers=1)
        log(f"  signed {count} messages of {len(pool[0])} bytes in "
            f"{time.monotonic() - started:.1f}s")
        for sessions in SESSIONS:
            for name in TARGET_NAMES:
                if name == "postfix" and not have_postfix:
                    continue
                row = run_inbound(name, dns_address, size, sessions, pool, warm, seconds)
                rows.append(row)
                log(f"  {name:9s} {size // 1024:4d} KB x{sessions}: {row['rate']:7.1f} msg/s  "
                    f"p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
                    f"stored/s {row.get('stored_rate', math.nan):7.1f}  "
                    f"cpu {row['cpu_ms_per_message']:.2f} ms/msg"
                    + (f"  FAILURES {row['failures']}: {row['first_failure']}"
                       if row["failures"] else ""))
    return rows


def _cell(rows: list[dict[str, Any]], target: str, size: int, sessions: int
          ) -> dict[str, Any] | None:
    return next((r for r in rows if (r["target"], r["size"], r["sessions"])
                 == (target, size, sessions)), None)


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
                rate = row.get("stored_rate", row["rate"]) if name == "postfix" else row["rate"]
                ratio = (ours["rate"] / rate) if ours and rate else math.nan
                lines.append(
                    f"| {size // 1024} KB | {sessions} | {name} | {row['rate']:.0f} | "
                    f"{row.get('stored_rate', math.nan):.0f} | {row['p50_ms']:.1f} | "
                    f"{row['p99_ms']:.1f} | {row['cpu_ms_per_message']:.2f} | "
                    f"{'—' if name == 'aimx' else f'{ratio:.2f}×'} |")
    return lines


def verdicts(results: dict[str, Any]) -> list[str]:
    """The issue's targets, each with the figure measured in this run."""
    out = []
    rows = results.get("inbound") or []
    ours = _cell(rows, "aimx", 4096, 8)
    postfix = _cell(rows, "postfix", 4096, 8)
    base = _cell(rows, "aiosmtpd", 4096, 8)
    if ours:
        if postfix:
            pf = min(postfix["rate"], postfix.get("stored_rate", postfix["rate"]))
            out.append(_verdict("inbound 4 KB x8 vs Postfix→Maildir", ours["rate"] / pf, 1.0,
                                f"{ours['rate']:.0f} vs {pf:.0f} msg/s"))
        if base:
            out.append(_verdict("inbound 4 KB x8 vs aiosmtpd baseline",
                                ours["rate"] / base["rate"], 2.0,
                                f"{ours['rate']:.0f} vs {base['rate']:.0f} msg/s"))
        out.append(_verdict("p99 end-of-DATA → 250 at 4 KB x8", ours["p99_ms"], 25.0,
                            f"{ours['p99_ms']:.1f} ms", lower_is_better=True))
    send = results.get("send")
    if send:
        out.append(_verdict("aimx send vs smtplib script", send["ratio"], 2.0,
                            f"{send['aimx_median_ms']:.0f} vs {send['smtplib_median_ms']:.0f} ms",
                            lower_is_better=True))
    lst = results.get("listing")
    if lst:
        out.append(_verdict(f"mailbox_list at {lst['messages']:,}", lst["mailbox_list_ms"], 50.0,
                            f"{lst['mailbox_list_ms']:.1f} ms", lower_is_better=True))
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
        out.append(_verdict("idle daemon RSS", mem["idle_kib"] / 1024, 60.0,
                            f"{mem['idle_kib'] / 1024:.1f} MB", lower_is_better=True))
    return out


def _verdict(label: str, value: float, limit: float, detail: str,
             lower_is_better: bool = False) -> str:
    met = value <= limit if lower_is_better else value >= limit
    bound = f"≤ {limit:g}" if lower_is_better else f"≥ {limit:g}"
    shown = f"{value:.2f}" if not lower_is_better or limit < 10 else f"{value:.1f}"
    return f"  [{'met ' if met else 'MISS'}] {label}: {shown} (target {bound}) — {detail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="length of each inbound run (default 8)")
    parser.add_argument("--only", default="inbound,send,listing,memory,mcp",
                        help="comma-separated parts to run")
    parser.add_argument("--mailbox-size", type=int, default=100_000)
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    if os.geteuid() != 0:
        log("warning: not root; Postfix rows are skipped and file ownership is not exercised")
    started = time.monotonic()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                           "load_before": os.getloadavg()}}
    key = new_key()
    with DnsServer(sender_zone(key.txt_record)) as dns:
        if "inbound" in parts:
            skip = ensure_installed("postfix")
            if skip:
                log(f"note: Postfix rows skipped: {skip}")
                results["postfix_skipped"] = skip
            log("inbound (each target started fresh per cell, same signed messages):")
            results["inbound"] = inbound(dns.address, key.private_pem, args.seconds, not skip)
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
                                 "concurrent_peak_kib": mem.concurrent_peak_kib}
            log(f"  idle {mem.idle_kib / 1024:.1f} MB, after one message "
                f"{mem.warm_kib / 1024:.1f} MB; 25 MB message: peak {mem.peak_kib / 1024:.1f} MB "
                f"({mem.peak_ratio:.1f}× the message, growth {mem.growth_ratio:.1f}×), "
                f"after {mem.after_big_kib / 1024:.1f} MB")
            log(f"  {mem.concurrent} concurrent 25 MB messages: peak "
                f"{mem.concurrent_peak_kib / 1024:.0f} MB over all processes (idle "
                f"{mem.concurrent_idle_kib / 1024:.0f} MB), {mem.concurrent_stored} stored")
    if "listing" in parts:
        log(f"listing a mailbox of {args.mailbox_size:,} messages:")
        lst = listing.measure(args.mailbox_size)
        results["listing"] = {
            "messages": lst.messages, "populate_s": lst.populate_s,
            "index_build_ms": lst.index_build_ms, "mailbox_list_ms": lst.mailbox_list_ms,
            "mailbox_list_scan_ms": lst.mailbox_list_scan_ms,
            "cases": [{"name": c.name, "mcp_cold_ms": c.mcp_cold_ms, "mcp_warm_ms": c.mcp_warm_ms,
                       "index_ms": c.index_ms, "rows": c.rows, "identical": c.identical}
                      for c in lst.cases]}
        log(f"  index built on first MAILBOX-LIST in {lst.index_build_ms / 1000:.1f} s; "
            f"MAILBOX-LIST {lst.mailbox_list_ms:.1f} ms (counting by reading every file: "
            f"{lst.mailbox_list_scan_ms:.0f} ms)")
        for c in lst.cases:
            log(f"  {c.name:42s} index {c.index_ms:6.1f} ms | aimx mcp today cold "
                f"{c.mcp_cold_ms:7.1f} ms warm {c.mcp_warm_ms:7.1f} ms | {c.rows} rows"
                f"{'' if c.identical else '  ROWS DIFFER'}")
    if "mcp" in parts:
        log(f"email_list through a real aimx mcp process ({args.mailbox_size:,} messages; "
            "bench/email_list.py, today's listing code):")
        done = subprocess.run(
            [sys.executable, "bench/email_list.py", "--messages", str(args.mailbox_size),
             "--rounds", "5"], cwd=str(REPO_ROOT), capture_output=True, text=True,
            timeout=1200, check=False)
        results["mcp_email_list"] = done.stdout
        for line in (done.stdout + (done.stderr if done.returncode else "")).splitlines():
            log(f"  {line}")
    if results.get("inbound"):
        log("")
        for line in inbound_table(results["inbound"]):
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
