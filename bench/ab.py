"""Interleaved A/B of two stepserve installs on one machine: is a change within noise?

Both servers are started once (an idle one takes no CPU); then, round after round, each is
measured in turn on the same loads from bench/loadgen.py, so slow drifts of the machine
(tens of percent over minutes on a shared 2-core VM) hit both alike. Loads per round:
saturation (closed-loop streams, 20 steps) and the mix's capacity (closed-loop mixed
requests with previews every step), both by Little's law as in bench/run.py.

    python bench/ab.py --a /path/to/old/.venv/bin/stepserve --b .venv/bin/stepserve \\
        [--a-batching step|request] [--b-batching step|request] \\
        [--rounds 3] [--seconds 20] [--streams 16] [--out bench/results]

(Two batching modes of one install compare the same way: --a and --b the same executable.)

Writes bench/results/<date>-<host>-ab.json with every round, the B/A ratio of each round
and their median, and prints them. A change is within noise when the per-round ratios
straddle 1.0. Anything else running on the machine meanwhile spoils the comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
from pathlib import Path
from typing import Any

from run import ROOT, Server, Setup, loadgen, summarize


def measure(srv: Server, streams: int, seconds: float) -> dict[str, float]:
    """Saturated images/s at 20 steps and the mix's capacity in requests/s."""
    window = (streams, 0.25 * seconds, seconds)
    sat = loadgen(srv.target, ["--streams", str(streams), "--duration", str(seconds), "--steps", "20"])
    mix = loadgen(
        srv.target,
        ["--streams", str(streams), "--duration", str(seconds), "--mix", "--preview", "--seed", "7"],
    )
    errors = sum(not r.get("ok") for r in sat + mix)
    if errors:
        raise RuntimeError(f"{errors} requests failed: the comparison would be meaningless")
    return {
        "saturation_images_per_s": summarize(sat, closed_loop=window)["images_per_s"],
        "mix_requests_per_s": summarize(mix, closed_loop=window)["images_per_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="the baseline's stepserve executable")
    ap.add_argument("--b", type=Path, required=True, help="the candidate's stepserve executable")
    ap.add_argument("--a-batching", default="step", choices=("step", "request"), help="A's --batching")
    ap.add_argument("--b-batching", default="step", choices=("step", "request"), help="B's --batching")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0, help="per load, per round")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args()
    setup = Setup(None, "cpu", "auto")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers = {
        name: Server(mode, logs / f"ab-{name}.log", setup, executable=exe)
        for name, exe, mode in (("a", args.a, args.a_batching), ("b", args.b, args.b_batching))
    }
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            row = {}
            for name in ("a", "b") if r % 2 == 0 else ("b", "a"):  # alternate who goes first
                row[name] = measure(servers[name], args.streams, args.seconds)
                print(f"round {r + 1} {name}: {row[name]}", flush=True)
            rounds.append(row)
    finally:
        for srv in servers.values():
            srv.stop()
    summary: dict[str, Any] = {}
    for key in rounds[0]["a"]:
        a = [row["a"][key] for row in rounds]
        b = [row["b"][key] for row in rounds]
        per_round = [y / x for x, y in zip(a, b, strict=True)]
        summary[key] = {
            "a_mean": statistics.fmean(a),
            "b_mean": statistics.fmean(b),
            "b_over_a_median": statistics.median(per_round),
            "b_over_a_per_round": per_round,
        }
        print(f"{key}: B/A median {statistics.median(per_round):.3f}, per round {per_round}")
    result = {
        "command": f"python bench/ab.py --a {args.a} --b {args.b} --a-batching {args.a_batching} "
        f"--b-batching {args.b_batching} --rounds {args.rounds} --seconds {args.seconds} "
        f"--streams {args.streams}",
        "rounds": rounds,
        "summary": summary,
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    modes = "" if args.a_batching == args.b_batching else f"-{args.a_batching}-vs-{args.b_batching}"
    path = args.out / f"{datetime.date.today().isoformat()}-{socket.gethostname()}-ab{modes}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
