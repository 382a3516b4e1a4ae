"""How long the CLI takes to answer the commands that load no model: each run as a fresh process, as a user types it.

    python benchmarks/cli_latency.py [--repeats 5]

Prints a markdown table: the median and the slowest wall time of `workbench --help`, `--version`, `stages`,
`schema`, `models list`, `validate` of the quickstart recipe and `validate` with no recipe, against the goal of
2 s, with this CPU's model and INT8 instruction sets (the same process start-up costs more on a busier or
slower machine: compare against `python -c pass`, timed the same way, in the same run).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.hardware.cpu import cpu_info  # noqa: E402

GOAL_S = 2.0
COMMANDS = [
    ("python -c pass (start-up alone)", [sys.executable, "-c", "pass"]),
    ("workbench --help", ["--help"]),
    ("workbench --version", ["--version"]),
    ("workbench stages", ["stages"]),
    ("workbench schema", ["schema"]),
    ("workbench models list 'yolov5*'", ["models", "list", "yolov5*"]),
    ("workbench models list 'cifar_resnet:*'", ["models", "list", "cifar_resnet:*"]),
    ("workbench validate recipes/quickstart.yaml", ["validate", "recipes/quickstart.yaml"]),
    ("workbench validate (no recipe)", ["validate"]),
]


def time_command(argv: list[str], repeats: int) -> tuple[list[float], int]:
    times, code = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - start)
        code = done.returncode
    return times, code


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cli = [sys.executable, "-m", "workbench"]
    print(f"# CLI answer time, {args.repeats} fresh processes per command\n\nCPU: {cpu_info().describe()}\n")
    print("| command | exit | median s | slowest s | within 2 s |\n|---|---|---|---|---|")
    for name, argv in COMMANDS:
        times, code = time_command(argv if argv[0] == sys.executable else cli + argv, args.repeats)
        median, worst = statistics.median(times), max(times)
        print(f"| `{name}` | {code} | {median:.2f} | {worst:.2f} | {'yes' if worst <= GOAL_S else 'NO'} |")


if __name__ == "__main__":
    main()
