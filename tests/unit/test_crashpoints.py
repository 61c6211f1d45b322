"""The named crash points: each one declared is passed through in the code, each one passed
through is declared, and a misspelt ORDERPIPE_CRASH_AT stops the process with what to fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from services.runtime.crashpoints import POINTS

REPO = Path(__file__).resolve().parents[2]


def test_every_declared_point_is_in_the_code_and_nothing_else() -> None:
    used = set()
    for path in [*REPO.joinpath("services").rglob("*.py"), *REPO.joinpath("streams").rglob("*.py")]:
        used |= set(re.findall(r'crash_point\("([^"]+)"\)', path.read_text()))
    assert used == set(POINTS)


def test_an_unknown_point_is_refused_with_the_known_ones() -> None:
    result = subprocess.run([sys.executable, "-c", "import services.runtime.crashpoints"], cwd=REPO,
                            capture_output=True, text=True, env={"ORDERPIPE_CRASH_AT": "consumer.after_lunch",
                                                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "ORDERPIPE_CRASH_AT=consumer.after_lunch: no such crash point" in result.stderr
    assert "consumer.after_commit" in result.stderr and "Traceback" not in result.stderr


def test_an_armed_point_kills_on_its_nth_pass_only() -> None:
    code = ("from services.runtime.crashpoints import crash_point\n"
            "for i in range(5):\n"
            "    crash_point('relay.after_ack'); crash_point('relay.after_produce'); print(i, flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={"ORDERPIPE_CRASH_AT": "relay.after_produce@3", "PATH": "/usr/bin:/bin"})
    assert result.returncode == -9
    assert result.stdout.split() == ["0", "1"]


def test_a_failure_point_raises_once_on_its_nth_pass_and_the_process_goes_on() -> None:
    code = ("from services.runtime.crashpoints import InjectedFailure, crash_point\n"
            "for i in range(4):\n"
            "    try:\n"
            "        crash_point('status.after_fold'); print(i, flush=True)\n"
            "    except InjectedFailure as exc:\n"
            "        print('failed', exc, flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={"ORDERPIPE_FAIL_AT": "status.after_fold@2", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["0", "failed ORDERPIPE_FAIL_AT=status.after_fold@2", "2", "3"]


def test_crash_and_failure_points_together_are_refused() -> None:
    result = subprocess.run([sys.executable, "-c", "import services.runtime.crashpoints"], cwd=REPO,
                            capture_output=True, text=True,
                            env={"ORDERPIPE_CRASH_AT": "relay.after_ack", "ORDERPIPE_FAIL_AT": "relay.after_ack",
                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "set one of ORDERPIPE_CRASH_AT and ORDERPIPE_FAIL_AT, not both" in result.stderr
