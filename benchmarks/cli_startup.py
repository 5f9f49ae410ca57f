"""CPU seconds of ``rxf --help`` and ``rxf finetune --help`` (a fresh interpreter each),
beside a bare ``python -c pass`` in the same run, the median of several repeats. The
command imports torch and transformers only inside the commands that need them, so help
answers at once. Never run as a test.

    python benchmarks/cli_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys


def cpu_seconds(command: list[str]) -> float:
    """User + system CPU seconds of one run of ``command`` (from wait4's resource usage)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "rxf --help": [sys.executable, "-m", "rxf.cli", "--help"],
        "rxf finetune --help": [sys.executable, "-m", "rxf.cli", "finetune", "--help"],
    }
    print(f"| command | CPU seconds (median of {args.repeats}) | ratio to python -c pass |\n|---|---|---|")
    base = None
    for name, command in commands.items():
        seconds = statistics.median(cpu_seconds(command) for _ in range(args.repeats))
        base = base or seconds
        print(f"| `{name}` | {seconds:.3f} | {seconds / base:.1f} |")


if __name__ == "__main__":
    main()
