"""Run every benchmark, print all rows with their ratios and targets, and optionally rewrite the README table.

    python benchmarks/run_all.py --quick                  # all benchmarks, small inputs (< 10 min on 2 cores)
    python benchmarks/run_all.py --quick --write-readme   # ... and rewrite the table in benchmarks/README.md
    python benchmarks/run_all.py --only ingest,memory     # a subset

Each benchmark module (`benchmarks/<name>.py` with a `run(quick)` function) runs in its own Python process
(`python -m benchmarks.<name>`): each starts its own Ray, and one's memory or leftover workers cannot skew
the next. Rows come back as `name: value` lines on the child's stdout. A module states its targets as a literal
`TARGETS = {"row_name": (">=", 1.0)}` (read from its source, not imported), so the table says which are met.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python benchmarks/run_all.py`: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import ast
import datetime
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import Row, format_value, machine_info, parse_rows

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOT_BENCHMARKS = {"__init__", "common", "run_all"}
# the table's rows, in order
ORDER = (
    "ingest",
    "score_throughput",
    "mae_step",
    "scaling",
    "memory",
    "shards",
    "gpu_pretrain",
    "prune_scale",
    "proxy_throughput",
    "score_memory",
)
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


@dataclass
class Outcome:
    """One benchmark module's run: its rows, how long it took, and the error if it failed."""

    name: str
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    targets: dict[str, tuple[str, float]] = field(default_factory=dict)


def discover() -> list[str]:
    """Benchmark module names under benchmarks/, in the issue's order, then any others alphabetically."""
    names = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS)
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def module_targets(name: str) -> dict[str, tuple[str, float]]:
    """A module's `TARGETS` literal, read from its source without importing it (imports can be heavy)."""
    tree = ast.parse((HERE / f"{name}.py").read_text())
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(node, ast.AnnAssign):
            target = node.target
        if isinstance(target, ast.Name) and target.id == "TARGETS" and node.value is not None:
            try:
                return dict(ast.literal_eval(node.value))
            except ValueError:
                log.warning("benchmarks/%s.py: TARGETS is not a literal; ignored", name)
    return {}


def run_module(name: str, quick: bool, timeout: float) -> Outcome:
    """Run `python -m benchmarks.<name> [--quick]` from the repository root; parse its rows."""
    command = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if quick else [])]
    start = time.perf_counter()
    outcome = Outcome(name=name, targets=module_targets(name))
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        outcome.seconds = time.perf_counter() - start
        outcome.rows = parse_rows(e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        outcome.error = f"timed out after {timeout:.0f} s"
        return outcome
    outcome.seconds = time.perf_counter() - start
    outcome.rows = parse_rows(done.stdout)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        outcome.error = f"exit {done.returncode}: {tail[0][:300]}"
        log.warning("benchmarks/%s.py failed:\n%s", name, done.stderr[-4000:])
    return outcome


def check(value: float, target: tuple[str, float]) -> bool:
    op, threshold = target
    if not math.isfinite(value):
        return False
    return {
        ">=": value >= threshold,
        ">": value > threshold,
        "<=": value <= threshold,
        "<": value < threshold,
    }[op]


def describe(value: float, target: tuple[str, float] | None) -> str:
    if target is None:
        return ""
    return f"{target[0]} {target[1]:g}: " + ("met" if check(value, target) else "MISSED")


def print_outcome(outcome: Outcome) -> None:
    print(
        f"# {outcome.name} ({outcome.seconds:.0f} s){'  FAILED: ' + outcome.error if outcome.error else ''}"
    )
    targets = outcome.targets
    for row, value in outcome.rows:
        note = describe(value, targets.get(row))
        print(f"{row}: {format_value(value)}" + (f"    # target {note}" if note else ""), flush=True)


def markdown(
    outcomes: list[Outcome], machine: dict[str, str], quick: bool, started: str, load_end: str
) -> str:
    """The README section: when and where it ran, then one table row per benchmark row."""
    lines = [
        f"Measured {started} with `python benchmarks/run_all.py{' --quick' if quick else ''}`, "
        f"{sum(o.seconds for o in outcomes):.0f} s in all.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in machine.items()],
        f"| load_avg_1_5_15 at the end | {load_end} |",
        "",
        "| benchmark | row | value | target |",
        "|---|---|---:|---|",
    ]
    for outcome in outcomes:
        targets = outcome.targets
        if outcome.error:
            lines.append(f"| {outcome.name} | (failed: {outcome.error}) | | |")
        for row, value in outcome.rows:
            lines.append(
                f"| {outcome.name} | `{row}` | {format_value(value)} | {describe(value, targets.get(row))} |"
            )
    return "\n".join(lines)


def write_readme(path: Path, section: str) -> None:
    """Replace the text between the results markers in `path` (append the markers if missing)."""
    text = path.read_text() if path.exists() else "# maskdiet benchmarks\n"
    block = f"{README_START}\n{section}\n{README_END}"
    if README_START in text and README_END in text:
        head, _, rest = text.partition(README_START)
        _, _, tail = rest.partition(README_END)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and fewer repeats")
    parser.add_argument("--write-readme", action="store_true", help="rewrite the table in the README")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md", help="README to rewrite")
    parser.add_argument("--only", default="", help="comma-separated module names (default: all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per module")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)

    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    machine = machine_info()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# machine: {', '.join(f'{k}={v}' for k, v in machine.items())}", flush=True)
    outcomes = []
    for name in names:
        outcome = run_module(name, args.quick, args.timeout)
        print_outcome(outcome)
        outcomes.append(outcome)
    total = sum(o.seconds for o in outcomes)
    print(f"# total: {total:.0f} s", flush=True)
    if args.write_readme:
        load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
        write_readme(args.readme, markdown(outcomes, machine, args.quick, started, load_end))
        print(f"# wrote the table to {args.readme}", flush=True)
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
