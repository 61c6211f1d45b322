"""Print the share of mutants killed per module after `mutmut run` (the `make mutate` summary).

Killed: a test failed (or timed out) on the mutant. Survived: every test passed. No tests: no
unit test runs that function, so nothing could kill it; it counts against the share.
Exits 1 when the overall share is below the target (first argument, in percent).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict

KILLED = {"killed", "timeout"}


def module_of(mutant: str) -> str:
    # services.runtime.consumer.xǁServiceConsumerǁ_admit__mutmut_3 -> services.runtime.consumer
    return ".".join(part for part in mutant.split(".") if not part.startswith("x"))


def main() -> int:
    target = float(sys.argv[1]) if len(sys.argv) > 1 else 90.0
    lines = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    per_module: dict[str, Counter] = defaultdict(Counter)
    for line in lines:
        name, _, status = line.strip().rpartition(": ")
        if name:
            per_module[module_of(name)][status] += 1
    total = Counter()
    print(f"{'module':40} {'killed':>7} {'survived':>9} {'no tests':>9} {'share':>7}")
    for module, counts in sorted(per_module.items()):
        total += counts
        print(_row(module, counts))
    print(_row("all", total))
    share = _share(total)
    print(f"target {target:g}%: {'met' if share >= target else 'NOT met'}")
    return 0 if share >= target else 1


def _share(counts: Counter) -> float:
    killed = sum(counts[s] for s in KILLED)
    return 100.0 * killed / max(1, sum(counts.values()))


def _row(name: str, counts: Counter) -> str:
    killed = sum(counts[s] for s in KILLED)
    return (f"{name:40} {killed:7} {counts['survived']:9} {counts['no tests']:9} {_share(counts):6.1f}%")


if __name__ == "__main__":
    sys.exit(main())
