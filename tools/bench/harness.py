"""Collect repeated measurements per (metric, case); report medians and ratios to a baseline."""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def results_dir(quick: bool = False) -> Path:
    """Committed results live in bench/results; --quick runs go to a scratch folder."""
    return REPO / "bench" / ("results-quick" if quick else "results")


@dataclass
class Metric:
    name: str
    unit: str
    higher_is_better: bool
    baseline: str | None
    values: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Report:
    name: str
    description: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def metric(
        self, name: str, unit: str, *, higher_is_better: bool = True, baseline: str | None = None
    ) -> Metric:
        if name not in self.metrics:
            self.metrics[name] = Metric(name, unit, higher_is_better, baseline)
        return self.metrics[name]

    def add(self, metric: str, case: str, value: float) -> None:
        self.metrics[metric].values.setdefault(case, []).append(value)

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for m in self.metrics.values():
            base = statistics.median(m.values[m.baseline]) if m.baseline in m.values else None
            for case, values in m.values.items():
                med = statistics.median(values)
                ratio = None
                if base:
                    ratio = med / base
                rows.append(
                    {
                        "metric": m.name,
                        "case": case,
                        "median": med,
                        "unit": m.unit,
                        "runs": len(values),
                        "min": min(values),
                        "max": max(values),
                        "baseline": m.baseline,
                        "ratio_to_baseline": ratio,
                        "higher_is_better": m.higher_is_better,
                    }
                )
        return rows

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.summary()
        machine = f"{platform.node()} {platform.machine()}, Python {platform.python_version()}"
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.started))
        lines = [
            f"# Benchmark: {self.name}",
            "",
            self.description,
            "",
            f"Run {when} on {machine}. Medians of the runs; ratio = median / the baseline "
            "case's median in this same run.",
            "",
            "| metric | case | median | unit | runs | ratio to baseline |",
            "|---|---|---:|---|---:|---:|",
        ]
        for r in rows:
            ratio = "" if r["ratio_to_baseline"] is None else f"{r['ratio_to_baseline']:.2f}x"
            if r["case"] == r["baseline"]:
                ratio = "1.00x (baseline)"
            lines.append(
                f"| {r['metric']} | {r['case']} | {_fmt(r['median'])} | {r['unit']} | "
                f"{r['runs']} | {ratio} |"
            )
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        md = directory / f"{self.name}.md"
        md.write_text("\n".join(lines) + "\n")
        js = directory / f"{self.name}.json"
        js.write_text(
            json.dumps(
                {
                    "name": self.name,
                    "started": self.started,
                    "machine": machine,
                    "rows": rows,
                    "notes": self.notes,
                },
                indent=2,
            )
            + "\n"
        )
        return md, js


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"
