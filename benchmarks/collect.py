"""``python -m benchmarks.collect DIR_OR_FILE ...``: one table from many benchmark runs.

A GPU window runs the benchmarks one scenario and one backend per process (``benchmarks/gpu_validate.sh``), so
its results are many ``results.md`` files (or their concatenation, as in ``summary.md``). This reads each run's
"Speedup of each pointins backend over the best reference" table and prints one Markdown row per scenario and
backend: the speedup of every dtype and mode, the mean % of roofline where the run gives one, and the run it
came from. A scenario and backend measured in several runs keeps the last one read (arguments in order, files
in sorted order within a folder).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .scenarios import SCENARIOS

COLUMNS = [(dtype, mode) for dtype in ("float32", "bfloat16") for mode in ("forward", "backward", "forward+backward")]
_RUN = re.compile(r"^## instance_aware_conv benchmarks", re.M)
_COMMAND = re.compile(r"`python -m benchmarks ([^`]*)`")
_STAMP = re.compile(r"; (\d{4}-\d{2}-\d{2}) [\d:]+ UTC; .*\(git ([^)]+)\)")


def runs(text: str):
    """(scenario, date, commit, rows) of each run in ``text``: rows maps (backend, dtype, mode) to (speedup
    cell, uncertain, % roofline)."""
    starts = [m.start() for m in _RUN.finditer(text)] + [len(text)]
    for begin, end in zip(starts, starts[1:]):
        block = text[begin:end]
        command = _COMMAND.search(block)
        scenario = re.search(r"--scenario (\S+)", command.group(1)) if command else None
        stamp = _STAMP.search(block)
        rows = {}
        in_summary = False
        for line in block.splitlines():
            if line.startswith("### "):
                in_summary = line.startswith("### Speedup of each pointins backend")
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if in_summary and len(cells) == 7 and (cells[1], cells[2]) in COLUMNS:
                speedup = cells[3].split(" ")[0]
                rows[cells[0], cells[1], cells[2]] = (speedup, cells[5] != "none", cells[6])
        yield (scenario.group(1) if scenario else "all", stamp.group(1) if stamp else "?",
               stamp.group(2) if stamp else "?", rows)


def collect(paths: list[Path]) -> dict:
    """{(scenario, backend): {"cells": {(dtype, mode): text}, "roofline": ..., "source": ...}}."""
    table: dict = {}
    for path in paths:
        files = sorted(path.rglob("*.md")) if path.is_dir() else [path]
        for file in files:
            for scenario, date, commit, rows in runs(file.read_text()):
                for (backend, dtype, mode), (speedup, uncertain, roofline) in rows.items():
                    entry = table.setdefault((scenario, backend), {"cells": {}, "roofline": "n/a"})
                    entry["cells"][dtype, mode] = speedup + (" ?" if uncertain else "")
                    if (dtype, mode) == ("bfloat16", "forward+backward"):
                        entry["roofline"] = roofline
                    entry["source"] = f"{file} ({date}, {commit})"
    return table


def markdown(table: dict, sources: bool = True) -> str:
    head = ["scenario", "backend"] + [f"{dtype} {mode.replace('forward+backward', 'fwd+bwd')}"
                                      for dtype, mode in COLUMNS] + ["% roofline bf16 fwd+bwd"] + ["run"] * sources
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(SCENARIOS)
    for (scenario, backend), entry in sorted(table.items(), key=lambda item: (
            order.index(item[0][0]) if item[0][0] in order else len(order), item[0])):
        cells = [entry["cells"].get(column, "—") for column in COLUMNS]
        source = [entry["source"]] if sources else []
        out.append("| " + " | ".join([scenario, backend, *cells, entry["roofline"], *source]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collect", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="results folders or Markdown files")
    parser.add_argument("--no-source", action="store_true", help="leave out the column naming each row's run")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.paths if not path.exists()]
    if missing:
        parser.error(f"no such file or folder: {missing}")
    table = collect(args.paths)
    if not table:
        print("benchmarks.collect: no benchmark tables found", file=sys.stderr)
        return 1
    print(markdown(table, sources=not args.no_source))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
