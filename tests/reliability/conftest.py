"""The reliability suite's tally: every case records what it found, and the run ends with one
table (suite, cases, passed, crashes, lies, leaks, converged).

Sizes: the default (CI) runs a short version of every suite; `POD_AGENT_RELIABILITY=full` runs
the full one (docs/reliability.md). `POD_AGENT_RELIABILITY_OUT=FILE` also writes the table as JSON.

Columns:
- cases: cases run; passed: cases that met every goal of their suite;
- crashes: a traceback, exit 3, a hang, or an agent thread/loop that died;
- lies: a marker, `status`, health or HTTP answer that claimed something untrue (a marker for an
  incomplete component, "ok" while broken);
- leaks: a planted secret found in a file or an output, or processes, threads, fds or memory
  that did not come back to normal;
- converged: cases where the next run converged once the fault was removed ("-" where the suite
  has no convergence goal).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest

FULL = os.environ.get("POD_AGENT_RELIABILITY", "").lower() == "full"


def size(short: int, full: int) -> int:
    """How many cases a suite runs: `short` in CI, `full` with POD_AGENT_RELIABILITY=full."""
    return full if FULL else short


@dataclass
class Row:
    cases: int = 0
    passed: int = 0
    crashes: int = 0
    lies: int = 0
    leaks: int = 0
    converged: int | None = None
    notes: list[str] = field(default_factory=list)


TABLE: dict[str, Row] = {}


class Tally:
    """tally.case(suite, crash=..., lie=..., leak=..., converged=None|bool, note=...)"""

    def case(self, suite: str, *, crash: bool = False, lie: bool = False, leak: bool = False,
             converged: bool | None = None, note: str = "") -> bool:
        row = TABLE.setdefault(suite, Row())
        row.cases += 1
        row.crashes += bool(crash)
        row.lies += bool(lie)
        row.leaks += bool(leak)
        if converged is not None:
            row.converged = (row.converged or 0) + bool(converged)
        ok = not (crash or lie or leak) and converged is not False
        row.passed += ok
        if note and not ok and len(row.notes) < 20:
            row.notes.append(note)
        return ok

    def info(self, suite: str, text: str) -> None:
        """A line printed under the table for this suite (figures, what the cases covered)."""
        TABLE.setdefault(suite, Row()).notes.append(text)


def pytest_collection_modifyitems(config, items) -> None:
    """Every reliability case is slow: the fast lane (`-m "not slow"`) leaves them to CI."""
    for item in items:
        if "reliability" in item.nodeid.split("::")[0]:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tally() -> Tally:
    return Tally()


def render(table: dict[str, Row] | None = None) -> str:
    table = TABLE if table is None else table
    head = ("suite", "cases", "passed", "crashes", "lies", "leaks", "converged")
    rows = [head] + [(name, str(r.cases), str(r.passed), str(r.crashes), str(r.lies),
                      str(r.leaks), "-" if r.converged is None else f"{r.converged}/{r.cases}")
                     for name, r in table.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def merge(parts: list[dict[str, dict]]) -> dict[str, Row]:
    """The tables of several pytest-xdist workers as one (each worker ran some of the cases)."""
    table: dict[str, Row] = {}
    for part in parts:
        for name, data in part.items():
            row = table.setdefault(name, Row())
            for key in ("cases", "passed", "crashes", "lies", "leaks"):
                setattr(row, key, getattr(row, key) + data[key])
            if data["converged"] is not None:
                row.converged = (row.converged or 0) + data["converged"]
            row.notes += data["notes"]
    return table


def print_table(terminalreporter, table: dict[str, Row]) -> None:
    terminalreporter.section(f"reliability ({'full' if FULL else 'short'} run)")
    terminalreporter.write_line(render(table))
    for name, row in table.items():
        for note in row.notes:
            terminalreporter.write_line(f"  {name}: {note}")
    out = os.environ.get("POD_AGENT_RELIABILITY_OUT")
    if out:
        with open(out, "w") as fh:
            json.dump({n: r.__dict__ for n, r in table.items()}, fh, indent=1)


def pytest_sessionfinish(session) -> None:
    """In a pytest-xdist worker: hand this worker's table to the controller (tests/conftest.py
    merges them and prints one table)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and TABLE:
        workeroutput["reliability_tally"] = json.dumps({n: r.__dict__ for n, r in TABLE.items()})


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if TABLE and getattr(config, "workeroutput", None) is None:  # a run without xdist
        print_table(terminalreporter, TABLE)
