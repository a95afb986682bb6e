"""A/B two commits on this machine: each commit's own bench, runs alternating, medians side by side.

    python bench/ab.py OLD NEW --only stores -n 3

Clones each commit into a temporary folder (sharing this repository's
objects, so a local commit works), then runs that clone's own
`bench/run.py --only ...` with this interpreter (this virtualenv: neither
clone needs its own), in the order old, new, new, old, old, new...: on a
machine whose load drifts, each side gets as many early runs as late ones.
Each run's key figures are printed as it ends; then, per figure, every
run's value, the median of each side and new / old.

Each commit runs its own harness, so an old commit is measured the way it
was then; a scenario the old harness lacks is refused before anything runs
(pick scenarios both have: `python bench/run.py --help` in each). Only
committed code is compared: commit (or stash) what you want measured.
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The figures printed unless --keys names others: throughput, ratios, tail latencies.
KEY_FIGURE = re.compile(r"_rps$|_vs_|_p99_ms$")


def git(*args, cwd=REPO):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def checkout(commit, folder):
    """A clone of this repository at `commit` in `folder`; its full commit id."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    git("clone", "--quiet", "--shared", "--no-checkout", str(REPO), str(folder))
    git("checkout", "--quiet", "--detach", sha, cwd=folder)
    return sha


def scenarios_of(folder):
    """The scenarios a clone's bench/run.py offers, from its `--only` choices."""
    if not (folder / "bench" / "run.py").exists():
        return set()
    usage = subprocess.run([sys.executable, "bench/run.py", "--help"], cwd=folder, capture_output=True,
                           text=True).stdout
    choices = re.search(r"--only \[\{([^}]*)\}", usage)
    return set(choices.group(1).split(",")) if choices else set()


def bench(folder, only, quick, results, variants=None):
    """One run of the clone's own bench; its summary."""
    argv = [sys.executable, "bench/run.py", "--only", *only, "--results", str(results)]
    if variants:
        argv += ["--variants", *variants]
    done = subprocess.run(argv + (["--quick"] if quick else []), cwd=folder, capture_output=True, text=True)
    (results / "output.txt").write_text(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed in {folder}:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads((results / "latest.json").read_text())["summary"]


def numeric(summary):
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def order(runs):
    """old, new, new, old, old, new...: `runs` of each, each side as often first as second."""
    pairs = [("old", "new") if n % 2 == 0 else ("new", "old") for n in range(runs)]
    return [side for pair in pairs for side in pair]


def report(figures, keys):
    """Per key: every run's value for each side, each side's median and new / old."""
    print(f"\n{'figure':<40} {'old runs':>24} {'new runs':>24} {'old':>9} {'new':>9} {'new/old':>8}")
    for key in keys:
        old, new = ([run[key] for run in figures[side] if key in run] for side in ("old", "new"))
        if not old or not new:
            continue
        mo, mn = statistics.median(old), statistics.median(new)
        ratio = f"{mn / mo:.2f}" if mo else "-"
        print(f"{key:<40} {', '.join(map(fmt, old)):>24} {', '.join(map(fmt, new)):>24} {fmt(mo):>9} {fmt(mn):>9}"
              f" {ratio:>8}")


def fmt(value):
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the commit to compare against (any git revision: a sha, main, HEAD~1)")
    parser.add_argument("new", help="the commit under test")
    parser.add_argument("--only", nargs="+", required=True, help="the scenarios to run (both commits must have them)")
    parser.add_argument("-n", "--runs", type=int, default=3, help="bench runs of each commit (default 3)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the bench: checks the A/B itself")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="passed to the bench: propagation runs only these transports (sse ws longpoll ...)")
    parser.add_argument("--keys", nargs="+",
                        help="the summary figures to show (default: every *_rps, *_vs_*, *_p99_ms)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results",
                        help="where ab-<date>/ keeps every run's report and output")
    args = parser.parse_args()
    out = args.results / f"ab-{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H-%M-%SZ')}"
    tmp = Path(tempfile.mkdtemp(prefix="changefeed-ab-"))
    try:
        clones, shas = {}, {}
        for side, commit in (("old", args.old), ("new", args.new)):
            clones[side] = tmp / side
            shas[side] = checkout(commit, clones[side])
            missing = set(args.only) - scenarios_of(clones[side])
            if missing:
                sys.exit(f"{side} commit {commit} ({shas[side][:10]}) has no bench scenario "
                         f"{', '.join(sorted(missing))}; it offers: {', '.join(sorted(scenarios_of(clones[side])))}")
        print(f"A/B of {' '.join(args.only)}: old {args.old} ({shas['old'][:10]}), new {args.new} "
              f"({shas['new'][:10]}), {args.runs} runs each; reports in {out}", flush=True)
        figures = {"old": [], "new": []}
        for n, side in enumerate(order(args.runs)):
            results = out / f"{len(figures[side]) + 1}-{side}"
            results.mkdir(parents=True)
            summary = numeric(bench(clones[side], args.only, args.quick, results, args.variants))
            figures[side].append(summary)
            keys = args.keys or [k for k in summary if KEY_FIGURE.search(k)]
            shown = ", ".join(f"{k} {fmt(summary[k])}" for k in keys if k in summary)
            print(f"run {n + 1}/{2 * args.runs}, {side} {len(figures[side])}: {shown}", flush=True)
        first = figures["new"][0]
        report(figures, args.keys or [k for k in first if KEY_FIGURE.search(k)])
        (out / "ab.json").write_text(json.dumps({"only": args.only, "quick": args.quick, "commits": shas,
                                                 "figures": figures}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
