"""Run every ``bench/bench_*.py`` and print one table: ``python -m bench [codec ...]``.

Arguments select modules by their name (``teacher`` is bench_teacher only) or, when no module
has that name, by a part of it (``pipe``). A module that fails is reported with its error and
the others still run; the exit status is 1 when any failed.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

COLUMNS = ("module", "name", "value", "unit", "ratio", "vs")


def discover(selected: list[str]) -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    if not selected:
        return names
    chosen: set[str] = set()
    for s in selected:
        exact = [n for n in names if n.removeprefix("bench_") == s.removeprefix("bench_")]
        chosen.update(exact or [n for n in names if s in n])
    return [n for n in names if n in chosen]


def fmt_number(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1000:  # three significant digits, with thousands separators
        return f"{float(f'{x:.3g}'):,.0f}"
    return f"{x:.3g}"


def fmt_row(module: str, row: dict[str, Any]) -> tuple[str, ...]:
    ratio = row.get("ratio")
    return (
        module,
        str(row["name"]),
        fmt_number(row["value"]),
        str(row["unit"]),
        "" if ratio is None else f"{fmt_number(ratio)}x",
        str(row.get("vs") or ""),
    )


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    right = {2, 4}  # numbers

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(COLUMNS))
    print(line(tuple("-" * w for w in widths)))
    for r in rows:
        print(line(r))


def run_module(name: str) -> list[tuple[str, ...]]:
    module = importlib.import_module(f"{__package__ or 'bench'}.{name}")
    rows = module.run()
    if not isinstance(rows, list):
        raise TypeError(f"{name}.run() returned {type(rows).__name__}, not a list of rows")
    out = []
    for row in rows:
        missing = {"name", "value", "unit"} - set(row)
        if missing:
            raise ValueError(f"{name}.run(): row {row!r} lacks {sorted(missing)}")
        out.append(fmt_row(name.removeprefix("bench_"), row))
    return out


def main(argv: list[str] | None = None) -> int:
    selected = sys.argv[1:] if argv is None else argv
    names = discover(selected)
    if not names:
        print(f"no bench/bench_*.py module matches {selected}", file=sys.stderr)
        return 2
    rows: list[tuple[str, ...]] = []
    failed: list[str] = []
    for name in names:
        started = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            rows += run_module(name)
        except Exception:  # one broken benchmark must not hide the others
            failed.append(name)
            print(f"{name} FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    if rows:
        print_table(rows)
    if failed:
        print(f"\n{len(failed)} of {len(names)} benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
