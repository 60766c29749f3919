"""Benchmarks: our code and its peers side by side in one run, reported as medians and ratios.

``lanekit bench NAME`` (or ``python -m tools.bench NAME``) writes
``bench/results/NAME.md`` and ``NAME.json``. Absolute numbers drift on these noisy
machines; the ratios between cases measured in the same run are what to read.
"""

from __future__ import annotations

import importlib

from .harness import Report, results_dir

BENCHMARKS = {
    "s3": "tools.bench.s3raw",
    "blockstore": "tools.bench.blockstore_api",
    "served": "tools.bench.served",
    "vmboot": "tools.bench.vmboot",
    "vfs": "tools.bench.vfsbench",
    "exec": "tools.bench.execbench",
    "net": "tools.bench.net",
    "lanes": "tools.bench.lanes",
    "gitwork": "tools.bench.gitwork",
    "commit": "tools.bench.commit",
}


def run_benchmark(name: str, *, quick: bool = False) -> int:
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    module = importlib.import_module(BENCHMARKS[name])
    report: Report = module.run(quick=quick)
    md, js = report.write(results_dir(quick))
    print(md.read_text())
    print(f"written: {md} {js}")
    return 0


__all__ = ["BENCHMARKS", "Report", "run_benchmark"]
