#!/usr/bin/env python3
"""Failover timeline: one TCP upload through the mqvpn tunnel (paths A + B) while uplink A fails and heals.

The client daemon runs with --path ethA --path ethB in the namespace lab (profile ``light``: A 100 Mbit/s 10 ms,
B 40 Mbit/s 30 ms one way; ``full``: A 300/10, B 80/30).  An iperf3 upload (cli -> server's TUN address) runs for
--seconds; at t = --fault-at path A fails, at t = --heal-at it comes back.  Fault kinds (--fault, default both,
each with freshly started daemons):

    blackhole   the delay line of A drops everything, both directions (link and carrier stay up)
    carrier     carrier loss: the router side of A goes down, the client's ethA shows NO-CARRIER

t = 0 is the start of iperf3's measurement on the receiver (the server): its 100 ms intervals are read live
(``-i 0.1 --forceflush``), and the fault and heal are timed against them; the sender (``iperf3 -J -i 0.1``) is
kept in the JSON output.  A thread samples the delay line counters of A and B every 100 ms (bytes forwarded
client -> server), and the client log's path and reconnect messages are placed on the same time line.

Output: throughput per 100 ms from 1 s before to 3 s after the fault and the heal, the longest gap (consecutive
intervals below 10 % of the pre-fault median), how long after the heal A forwards traffic again, whether the
client reconnected, and a PNG plot (failover-<fault>.png per fault kind in the current directory, or one
combined plot with --png FILE).

    sudo .venv/bin/python bench/failover_timeline.py [--fault blackhole|carrier|both] [--profile light|full]
        [--seconds 14] [--fault-at 4] [--heal-at 9] [--png FILE | --no-png] [--json FILE]

Default settings take about 35 s.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import threading
import time
from bisect import bisect_right

from _mplab import (
    PROFILES,
    LinkCounters,
    MpLab,
    fmt,
    host_info,
    kill,
    log_events,
    median,
    preflight,
    table,
    terminate_on_signals,
)

STEP = 0.1  # seconds per interval
LOG_PATTERNS = [r"path \d+ over", r"reconnect", r"tunnel lost", r"connected to", r"error", r"abandon"]
_LINE = re.compile(r"^\[\s*(\d+|SUM)\]\s+([\d.]+)-\s*([\d.]+)\s+sec\s+([\d.]+)\s+([KMGT]?)Bytes\s+([\d.]+)\s+([KMGT]?)bits/sec")
_UNIT = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_interval(line: str) -> tuple[float, float, float] | None:
    """(start, end, Mbit/s) of an iperf3 text interval line, else None."""
    m = _LINE.match(line.strip())
    if not m:
        return None
    return float(m.group(2)), float(m.group(3)), float(m.group(6)) * _UNIT[m.group(7)] / 1e6


class Sampler(threading.Thread):
    """Samples the counters of A and B every STEP seconds: (monotonic time, {"offered": bytes the client sent
    into the path (delay line input), "line": bytes the delay line passed on (not blackholed), "link": bytes the
    rate limiter sent}), each {"A": {"up": bytes, "down": bytes}, "B": ...}."""

    def __init__(self, mp: MpLab):
        super().__init__(daemon=True)
        self.mp, self.samples, self.stop = mp, [], threading.Event()
        self.base = time.monotonic()
        self.links = LinkCounters(mp.lab)

    def align(self, t: float) -> None:
        """Sample at t + k * STEP from now on (t: the receiver's interval grid)."""
        self.base = t

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                both = self.mp.counters_both()
                c = {"line": both["tx_bytes"], "offered": both["rx_bytes"], "link": self.links.read()}
            except (OSError, ValueError, RuntimeError):  # the lab is going away
                return
            now = time.monotonic()
            self.samples.append((now, c))
            k = (now - self.base) // STEP + 1
            self.stop.wait(max(0.0, self.base + k * STEP - time.monotonic()))

    def rate(self, path: str, t_from: float, t_to: float, source: str = "link", direction: str = "up") -> float:
        """Mbit/s on ``path`` between two monotonic times (counters interpolated linearly)."""
        return (self.cumulative(path, t_to, source, direction)
                - self.cumulative(path, t_from, source, direction)) * 8 / 1e6 / (t_to - t_from)

    def cumulative(self, path: str, t: float, source: str = "link", direction: str = "up") -> float:
        ts = [s[0] for s in self.samples]
        i = bisect_right(ts, t)
        if i == 0:
            return float(self.samples[0][1][source][path][direction])
        if i == len(ts):
            return float(self.samples[-1][1][source][path][direction])
        (ta, ca), (tb, cb) = self.samples[i - 1], self.samples[i]
        a, b = ca[source][path][direction], cb[source][path][direction]
        return a + (b - a) * (t - ta) / (tb - ta)


def inject(mp: MpLab, fault: str, on: bool) -> None:
    if fault == "blackhole":
        mp.lab.path("A").blackhole(on)
    elif on:
        mp.lab.link_down("A")
    else:
        mp.lab.link_up("A")


def run_fault(mp: MpLab, fault: str, args, log) -> dict:
    mp.start_vpn(args.scheduler, args.cc, label=f"{fault}-{args.scheduler}-{args.cc}")
    log(f"[{fault}] VPN up (--scheduler {args.scheduler} --cc {args.cc}); upload for {args.seconds:g} s, "
        f"fault on A at {args.fault_at:g} s, heal at {args.heal_at:g} s")
    lines: list[tuple[float, str]] = []
    first = threading.Event()
    server = mp.iperf_server(mp.tunnel_addr, "-i", str(STEP), "--forceflush", "-f", "k",
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def read() -> None:
        for line in server.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
            if parse_interval(line):
                first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sampler = Sampler(mp)
    sampler.start()
    client = mp.lab.popen("cli", "iperf3", "-c", mp.tunnel_addr, "-J", "-i", str(STEP), "-t", str(args.seconds),
                          "--connect-timeout", "5000", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res = {"fault": fault, "events": {}, "error": None}
    sent_json = None
    try:
        if not first.wait(15):
            raise RuntimeError("no iperf3 interval within 15 s:\n" + "\n".join(l for _, l in lines[-10:]))
        t_arr, line = next((t, l) for t, l in lines if parse_interval(l))
        t0 = t_arr - parse_interval(line)[1]  # first estimate; refined below
        sampler.align(t0)
        for name, at, on in (("fault", args.fault_at, True), ("heal", args.heal_at, False)):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            t_begin = time.monotonic()
            inject(mp, fault, on)
            res["events"][name] = (t_begin, time.monotonic())
            log(f"[{fault}] {name} at t={t_begin - t0:.2f} s (took {1000 * (time.monotonic() - t_begin):.0f} ms)")
        try:
            out, err = client.communicate(timeout=max(0.0, t0 + args.seconds - time.monotonic()) + 20)
            sent_json = json.loads(out) if out.strip() else None
            if client.returncode:
                res["error"] = (sent_json or {}).get("error") or f"iperf3 client exited {client.returncode}: {err.strip()[:200]}"
        except subprocess.TimeoutExpired:
            res["error"] = "iperf3 client hung after the test (killed)"
        except json.JSONDecodeError as exc:
            res["error"] = f"bad iperf3 JSON: {exc}"
    finally:
        kill(client)
        time.sleep(0.3)
        sampler.stop.set()
        sampler.join(5)
        sampler.links.close()
        kill(server)
        reader.join(5)
        if fault == "carrier" and not mp.lab.carrier("A"):
            mp.lab.link_up("A")
        mp.lab.path("A").blackhole(False)
    client_log = mp.vpn.log(mp.client_log)
    mp.stop_vpn()
    return analyse(res, lines, sampler, sent_json, client_log, args)


def analyse(res: dict, lines, sampler: Sampler, sent_json, client_log: str, args) -> dict:
    intervals = []  # (start, end, Mbit/s, arrival)
    for t, line in lines:
        if line.startswith("- - -"):
            break  # the summary follows
        iv = parse_interval(line)
        if iv:
            intervals.append((*iv, t))
    t0 = min(arr - end for _, end, _, arr in intervals)  # the least delayed report gives the receiver's start
    wall0 = time.time() - (time.monotonic() - t0)
    fault_t = res["events"]["fault"][0] - t0
    heal_t = res["events"]["heal"][0] - t0
    n = round(args.seconds / STEP)
    grid = [float("nan")] * n  # receiver Mbit/s per 100 ms slot; a slot without a report counts as 0
    for start, end, mbps, _ in intervals:
        k = round(start / STEP)
        if 0 <= k < n:
            grid[k] = mbps
    grid = [0.0 if math.isnan(g) else g for g in grid]
    slots = [k * STEP for k in range(n)]
    path_rate = {p: [sampler.rate(p, t0 + s, t0 + s + STEP) for s in slots] for p in ("A", "B")}
    line_rate = {p: [sampler.rate(p, t0 + s, t0 + s + STEP, "line") for s in slots] for p in ("A", "B")}
    offered = {p: [sampler.rate(p, t0 + s, t0 + s + STEP, "offered") for s in slots] for p in ("A", "B")}
    pre = [g for s, g in zip(slots, grid, strict=True) if s >= min(1.0, fault_t / 2) and s + STEP <= fault_t + 1e-6]
    pre_median = median(pre)
    thr = 0.1 * pre_median

    def longest_gap(lo: float, hi: float) -> tuple[float, float | None]:
        """Longest run of slots below thr starting in [lo, hi): (ms, its start t)."""
        best, best_at, run, run_at = 0, None, 0, None
        for s, g in zip(slots, grid, strict=True):
            if g < thr and s >= 0.5:
                run, run_at = run + 1, run_at if run else s
                if run_at is not None and lo <= run_at < hi and run > best:
                    best, best_at = run, run_at
            else:
                run, run_at = 0, None
        return best * STEP * 1000, best_at

    a_pre = median([r for s, r in zip(slots, path_rate["A"], strict=True) if s >= 1.0 and s + STEP <= fault_t])
    pre_a = sum(r for s, r in zip(slots, path_rate["A"], strict=True) if s + STEP <= fault_t)
    pre_b = sum(r for s, r in zip(slots, path_rate["B"], strict=True) if s + STEP <= fault_t)
    a_share = pre_a / (pre_a + pre_b) if pre_a + pre_b else math.nan

    def a_back(min_rate: float) -> float | None:
        """ms from the heal until a sampler interval shows A forwarding more than min_rate Mbit/s."""
        for (ta, ca), (tb, cb) in zip(sampler.samples, sampler.samples[1:]):
            if ta < res["events"]["heal"][0] - 0.01:
                continue
            if (cb["link"]["A"]["up"] - ca["link"]["A"]["up"]) * 8 / 1e6 / (tb - ta) > min_rate:
                return (tb - res["events"]["heal"][0]) * 1000
        return None

    events = [(t - wall0, msg) for t, msg in log_events(client_log, LOG_PATTERNS) if t - wall0 > -5]
    sender = []
    if sent_json:
        sender = [(iv["sum"]["start"], iv["sum"]["bits_per_second"] / 1e6) for iv in sent_json.get("intervals", [])]
    res.update({
        "fault_t": fault_t, "heal_t": heal_t, "slots": slots, "goodput": grid, "path_mbps": path_rate,
        "delay_line_mbps": line_rate, "offered_mbps": offered,
        "a_offered_during_fault_mb": offered_between(sampler, *res["events"]["fault"][1:], res["events"]["heal"][0]),
        "sender": sender, "pre_fault_median": pre_median, "a_pre_fault_median": a_pre,
        "gap_overall": longest_gap(0, args.seconds), "gap_fault": longest_gap(fault_t - STEP, heal_t - STEP),
        "gap_heal": longest_gap(heal_t - STEP, args.seconds),
        "a_first_bytes_ms": a_back(0.0), "a_carries_ms": a_back(max(1.0, 0.0 if math.isnan(a_pre) else 0.1 * a_pre)),
        "a_share_pre_fault": a_share,
        "reconnected": "reconnecting" in client_log or "tunnel lost" in client_log,
        "log_events": events,
        "retransmits": (sent_json or {}).get("end", {}).get("sum_sent", {}).get("retransmits"),
        "received_mb": sum(g * STEP / 8 for g in grid),
        "raw_intervals": [(s, e, m, a - t0) for s, e, m, a in intervals],
        "samples": [(t - t0, c) for t, c in sampler.samples],
    })
    return res


def offered_between(sampler: Sampler, t_from: float, t_to: float) -> float:
    """MB the client put on A between the first sample after t_from and the last before t_to (no interpolation:
    a fault must not be charged with what was sent just before it)."""
    inside = [c["offered"]["A"]["up"] for t, c in sampler.samples if t_from <= t <= t_to]
    return (inside[-1] - inside[0]) / 1e6 if len(inside) > 1 else 0.0


def timeline_table(r: dict) -> str:
    rows = []
    for j in range(-10, 31):
        cells = [f"{j * STEP:+.1f}"]
        for at in (r["fault_t"], r["heal_t"]):
            k = round(at / STEP) + j  # slot k covers [k*STEP, (k+1)*STEP)
            if 0 <= k < len(r["slots"]):
                cells += [f"{r['slots'][k]:.1f}", fmt(r["goodput"][k]), fmt(r["offered_mbps"]["A"][k]),
                          fmt(r["path_mbps"]["A"][k]), fmt(r["path_mbps"]["B"][k])]
            else:
                cells += ["", "", "", "", ""]
        rows.append(cells)
    head = ["dt", "t", "goodput", "A sent", "A", "B", "t", "goodput", "A sent", "A", "B"]
    return (f"            -- around the fault (t={r['fault_t']:.2f}) --             "
            f"-- around the heal (t={r['heal_t']:.2f}) --\n" + table(head, rows))


def summary(results: list[dict]) -> str:
    def gap(g):
        ms, at = g
        return f"{ms:.0f} ms" + (f" @{at:.1f}" if at is not None else "")

    def ms(v):
        return "never" if v is None else f"{v:.0f} ms"

    rows = [[r["fault"], fmt(r["pre_fault_median"]), fmt(100 * r["a_share_pre_fault"], ".0f") + " %", gap(r["gap_overall"]), gap(r["gap_fault"]), gap(r["gap_heal"]),
             f"{r['a_offered_during_fault_mb']:.1f}", ms(r["a_first_bytes_ms"]), ms(r["a_carries_ms"]),
             "YES" if r["reconnected"] else "no",
             str(r["retransmits"]), f"{r['received_mb']:.0f}", r["error"] or ""] for r in results]
    head = ["fault", "pre Mbit/s", "on A pre", "longest gap", "gap after fault", "gap after heal", "MB sent on A in fault",
            "A bytes after heal",
            "A >=10% after heal", "reconnect", "retr", "MB recv", "error"]
    return table(head, rows, [False] + [True] * 11 + [False])


def plot(path: str, results: list[dict], args, title: str) -> None:
    from pngplot import plot_lines

    series = []
    for r in results:
        tag = f"{r['fault']}: " if len(results) > 1 else ""
        xs = [s + STEP / 2 for s in r["slots"]]
        series.append((f"{tag}goodput", xs, r["goodput"]))
        series.append((f"{tag}path A up", xs, r["path_mbps"]["A"]))
        series.append((f"{tag}path B up", xs, r["path_mbps"]["B"]))
    r = results[0]
    plot_lines(path, series, title=title, xlabel="t (s) since the start of the upload",
               ylabel="Mbit/s per 100 ms", vlines=[(r["fault_t"], "fault A"), (r["heal_t"], "heal A")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", choices=("blackhole", "carrier", "both"), default="both")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="light")
    parser.add_argument("--seconds", type=float, default=14.0)
    parser.add_argument("--fault-at", type=float, default=4.0)
    parser.add_argument("--heal-at", type=float, default=9.0)
    parser.add_argument("--scheduler", choices=("wlb", "minrtt", "backup"), default="wlb")
    parser.add_argument("--cc", choices=("cubic", "newreno", "bbr", "bbr2"), default="cubic")
    parser.add_argument("--png", metavar="FILE", help="one combined plot (default: failover-<fault>.png each)")
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="write the raw results to FILE")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the daemons' logs into DIR")
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), default="info",
                        help="the daemons' log level (default info; debug costs throughput)")
    args = parser.parse_args()
    if not 0.5 <= args.fault_at < args.heal_at < args.seconds:
        parser.error("need 0.5 <= --fault-at < --heal-at < --seconds")
    faults = ["blackhole", "carrier"] if args.fault == "both" else [args.fault]
    preflight()
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    info = host_info()
    a, b = PROFILES[args.profile]["A"], PROFILES[args.profile]["B"]
    print(f"failover timeline: profile {args.profile} (A {a[0]:g} Mbit/s {a[1]:g} ms, B {b[0]:g} Mbit/s {b[1]:g} ms "
          f"one way); faults {', '.join(faults)}; host {info['cpus']} CPUs, load "
          f"{' '.join(f'{x:.2f}' for x in info['loadavg'])}", flush=True)
    results: list[dict] = []
    interrupted = False
    with terminate_on_signals():
        mp = None
        try:
            mp = MpLab(args.keep_logs, args.log_level)
            mp.apply_profile(args.profile)
            for fault in faults:
                try:
                    results.append(run_fault(mp, fault, args, log))
                except RuntimeError as exc:
                    log(f"[{fault}] failed: {exc}")
                    mp.stop_vpn()
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: tearing the lab down", file=sys.stderr)
        finally:
            if mp is not None:
                mp.close()
    for r in results:
        print(f"\n== {r['fault']} on A: per 100 ms, Mbit/s. goodput: iperf3 receiver; A sent: what the client put "
              f"on uplink A (delay line input, blackholed or not); A, B: what each uplink carried client -> server "
              f"(after its rate limiter) ==")
        print(timeline_table(r))
        print(f"client log ({'t relative to the upload start'}):")
        for t, msg in r["log_events"]:
            print(f"  t={t:6.2f}  {msg[:150]}")
    if results:
        print("\nSummary. on A pre: A's share of the bytes before the fault. gaps: consecutive 100 ms intervals of "
              "goodput below 10 % of the pre-fault median (@t: where the gap starts). After the heal, A bytes: the "
              "first 100 ms with anything on A; A >=10%: the first with at least 10 % of A's pre-fault rate (and "
              "1 Mbit/s) on A.")
        print(summary(results))
        for r in results:
            if not r["a_share_pre_fault"] >= 0.5:
                print(f"WARNING: {r['fault']}: uplink A carried only {fmt(100 * r['a_share_pre_fault'], '.0f')} % of "
                      f"the upload before the fault, so the fault on A tested little (the scheduler kept to B)")
    if results and not args.no_png:
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        if args.png:
            plot(args.png, results, args, f"Failover on path A ({args.profile}): {', '.join(r['fault'] for r in results)}")
            print(f"plot: {args.png}")
        else:
            for r in results:
                path = f"failover-{r['fault']}.png"
                plot(path, [r], args, f"Failover: {r['fault']} on path A ({args.profile})")
                print(f"plot: {path}")
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"args": vars(args), "host": info}, "results": results}, f, indent=1, default=str)
        print(f"raw results in {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
