#!/usr/bin/env python3
"""Multipath aggregation: TCP goodput through the mqvpn tunnel over two uplinks vs the uplinks alone, one run.

In the namespace lab (tests/netns/lab.py) the client has uplinks A and B, shaped per profile (both directions):

    full   A 300 Mbit/s 10 ms one way, B 80 Mbit/s 30 ms one way
    light  A 100 Mbit/s 10 ms,          B 40 Mbit/s 30 ms

For each profile it measures, side by side in the same run:

1. direct capacity: iperf3 TCP upload cli -> srv over A alone and over B alone (the client socket bound to the
   uplink's address and device; the delay line counters confirm the path), and their sum;
2. through the tunnel (client daemon with --path ethA --path ethB; iperf3 server in srv bound to the server's
   TUN address) for each scheduler x CC x number of parallel flows: receiver-side goodput, upload (and download
   with --download), and the bytes each path's delay line forwarded in the data direction.

The daemons are restarted per (scheduler, CC), not per run.  Each figure is the median of --runs runs (the host is
shared and noisy: compare ratios within one run, never assert speeds).

    sudo .venv/bin/python bench/multipath_aggregation.py [--profile full|light|both] [--runs 3] [--seconds 10]
        [--schedulers minrtt,wlb] [--cc cubic[,bbr]] [--flows 1,4,16] [--download] [--json FILE]

Default settings take about 10 minutes (both profiles, upload only); see --help.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _mplab import (
    PROFILES,
    MpLab,
    fmt,
    host_info,
    median,
    preflight,
    table,
    terminate_on_signals,
)

SCHEDULERS = ("wlb", "minrtt", "backup")
CCS = ("cubic", "newreno", "bbr", "bbr2")


def csv(kind, choices=None):
    def parse(text: str) -> list:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if not items or (choices and any(i not in choices for i in items)):
            raise argparse.ArgumentTypeError(f"a comma list{' of ' + '|'.join(choices) if choices else ''}")
        return items
    return parse


def estimate(args) -> float:
    profiles = 2 if args.profile == "both" else 1
    dirs = 2 if args.download else 1
    per_run = args.seconds + args.omit + 1.0  # measured: ~0.5-1 s of setup per iperf3 run
    direct = 2 * dirs * args.runs * per_run
    tunnel = len(args.schedulers) * len(args.cc) * (3 + len(args.flows) * dirs * args.runs * per_run)
    return 5 + profiles * (direct + tunnel)


def measure_direct(mp: MpLab, args, direction: str, log) -> dict:
    """Direct TCP over each uplink alone, VPN not running."""
    lab = mp.lab
    out = {}
    for name in ("A", "B"):
        up = lab.uplink(name)
        other = "B" if name == "A" else "A"
        runs = []
        for _ in range(args.runs):
            before = mp.counters()
            r = mp.iperf(lab.server_addr, seconds=args.seconds, flows=args.direct_flows, omit=args.omit,
                         reverse=direction == "down", bind=up.addr, client_args=("--bind-dev", up.dev))
            d = mp.delta(before, mp.counters())
            r["bytes"] = d
            total = d[name][direction] + d[other][direction]
            r["on_path"] = d[name][direction] / total if total else 0.0
            runs.append(r)
            log(f"  direct {name} {direction:4s}: {fmt(r['mbps'])} Mbit/s, {100 * r['on_path']:.1f} % of the bytes "
                f"on {name}{'  ERROR ' + r['error'] if r['error'] else ''}")
        out[name] = {"runs": runs, "mbps": median([r["mbps"] for r in runs]),
                     "path_ok": all(r["on_path"] > 0.95 for r in runs)}
    out["sum"] = out["A"]["mbps"] + out["B"]["mbps"]
    return out


def measure_tunnel(mp: MpLab, args, profile: str, direct: dict, rows: list[dict], log) -> None:
    """Appends one row per (scheduler, cc, direction, flows) to ``rows`` (so an interruption keeps them)."""
    for sched in args.schedulers:
        for cc in args.cc:
            t0 = time.monotonic()
            try:
                mp.start_vpn(sched, cc)
            except RuntimeError as exc:
                log(f"  the VPN did not come up with --scheduler {sched} --cc {cc}: {exc}")
                mp.stop_vpn()
                continue
            log(f"  VPN up with --scheduler {sched} --cc {cc} (server TUN {mp.tunnel_addr}) "
                f"in {time.monotonic() - t0:.1f} s")
            for direction in args.directions:
                for flows in args.flows:
                    runs = []
                    for _ in range(args.runs):
                        if not mp.vpn_alive():
                            log("  a daemon died: restarting them\n" + mp.vpn.log(mp.client_log)[-1500:])
                            try:
                                mp.start_vpn(sched, cc)
                            except RuntimeError as exc:
                                log(f"  restart failed: {exc}")
                                break
                        before = mp.counters()
                        r = mp.iperf(mp.tunnel_addr, seconds=args.seconds, flows=flows, omit=args.omit,
                                     reverse=direction == "down")
                        d = mp.delta(before, mp.counters())
                        r["bytes"] = d
                        total = d["A"][direction] + d["B"][direction]
                        r["share_b"] = d["B"][direction] / total if total else float("nan")
                        runs.append(r)
                        log(f"    {sched:6s} {cc:6s} {direction:4s} P{flows:<3d} {fmt(r['mbps']):>7s} Mbit/s  "
                            f"B {fmt(100 * r['share_b']):>5s} %  retr {r['retransmits']}"
                            f"{'  ERROR ' + r['error'] if r['error'] else ''}")
                    if not runs:
                        continue
                    mbps = median([r["mbps"] for r in runs])
                    ref = direct[direction]
                    rows.append({
                        "profile": profile, "scheduler": sched, "cc": cc, "flows": flows, "direction": direction,
                        "mbps": mbps, "runs": runs,
                        "of_sum": mbps / ref["sum"] if ref["sum"] else float("nan"),
                        "of_a": mbps / ref["A"]["mbps"] if ref["A"]["mbps"] else float("nan"),
                        "share_b": median([r["share_b"] for r in runs]),
                        "errors": sum(1 for r in runs if r["error"]),
                    })
            mp.stop_vpn()


def report(results: dict) -> str:
    out = []
    drows = []
    for profile, per_dir in results["direct"].items():
        for direction, d in per_dir.items():
            drows.append([profile, direction, fmt(d["A"]["mbps"]), fmt(d["B"]["mbps"]), fmt(d["sum"]),
                          "yes" if d["A"]["path_ok"] and d["B"]["path_ok"] else "NO (see log)"])
    out.append("Direct capacity (TCP, each uplink alone, median Mbit/s):")
    out.append(table(["profile", "dir", "A", "B", "A+B", "path checked"], drows, [False, False, True, True, True, False]))
    trows = []
    for r in results["tunnel"]:
        trows.append([r["profile"], r["scheduler"], r["cc"], r["direction"], str(r["flows"]), fmt(r["mbps"]),
                      fmt(100 * r["of_sum"], ".0f") + " %", fmt(100 * r["of_a"], ".0f") + " %",
                      fmt(100 * r["share_b"], ".1f") + " %",
                      "/".join(fmt(x["mbps"], ".0f", "x") for x in r["runs"]) + (f"  ({r['errors']} failed)" if r["errors"] else "")])
    out.append("")
    out.append("Through the tunnel (--path ethA --path ethB), receiver goodput, median of runs:")
    out.append(table(["profile", "scheduler", "cc", "dir", "flows", "Mbit/s", "of A+B", "of A", "bytes on B", "runs"],
                     trows, [False, False, False, False] + [True] * 5 + [False]))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=("full", "light", "both"), default="both")
    parser.add_argument("--schedulers", type=csv(str, SCHEDULERS), default=["minrtt", "wlb"])
    parser.add_argument("--cc", type=csv(str, CCS), default=["cubic"])
    parser.add_argument("--flows", type=csv(int), default=[1, 4, 16])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per iperf3 run (default 10)")
    parser.add_argument("--omit", type=float, default=1.0,
                        help="seconds of slow start iperf3 leaves out before measuring (default 1; 0 to count all)")
    parser.add_argument("--direct-flows", type=int, default=4, help="parallel flows of the direct measurement (default 4)")
    parser.add_argument("--download", action="store_true", help="also measure downloads (iperf3 -R)")
    parser.add_argument("--json", metavar="FILE", help="write the raw results to FILE")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the daemons' logs into DIR")
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), default="info",
                        help="the daemons' log level (default info; debug costs throughput)")
    args = parser.parse_args()
    if args.runs < 1 or args.seconds <= 0 or any(f < 1 for f in args.flows):
        parser.error("--runs, --seconds and --flows must be positive")
    args.directions = ["up", "down"] if args.download else ["up"]
    profiles = ["full", "light"] if args.profile == "both" else [args.profile]
    preflight()

    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    info = host_info()
    print(f"multipath aggregation: profiles {', '.join(profiles)}; schedulers {','.join(args.schedulers)}; "
          f"cc {','.join(args.cc)}; flows {','.join(map(str, args.flows))}; {', '.join(args.directions)}; "
          f"{args.runs} run(s) x {args.seconds:g} s (+{args.omit:g} s omitted); estimated {estimate(args) / 60:.0f} min")
    print(f"host: {info['cpus']} CPUs, load average {' '.join(f'{x:.2f}' for x in info['loadavg'])}", flush=True)
    results = {"meta": {"args": {k: v for k, v in vars(args).items()}, "host": info, "profiles": PROFILES},
               "direct": {}, "tunnel": []}
    interrupted = False
    with terminate_on_signals():
        mp = None
        try:
            mp = MpLab(args.keep_logs, args.log_level)
            log(f"lab {mp.lab.prefix} up")
            for profile in profiles:
                mp.apply_profile(profile)
                a, b = PROFILES[profile]["A"], PROFILES[profile]["B"]
                log(f"profile {profile}: A {a[0]:g} Mbit/s {a[1]:g} ms, B {b[0]:g} Mbit/s {b[1]:g} ms (one way)")
                results["direct"][profile] = {}
                for d in args.directions:
                    results["direct"][profile][d] = measure_direct(mp, args, d, log)
                measure_tunnel(mp, args, profile, results["direct"][profile], results["tunnel"], log)
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: tearing the lab down; partial results follow", file=sys.stderr)
        finally:
            if mp is not None:
                mp.close()
    results["meta"]["elapsed_s"] = time.monotonic() - started
    print()
    print(report(results))
    print(f"\ntotal {results['meta']['elapsed_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"raw results in {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
