"""What a run leaves behind: the Markdown tables on stdout, CSV + JSON rows, and a PNG plot.

CSV and JSON keep every number at full precision (Python's shortest round-trip repr) and carry the
machine, the versions, the date and the shapes; the Markdown rounds for reading.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .fixed_cost import TINY, is_fixed_cost
from .model import MODEL
from .providers import BEST_REFERENCE, POINTINS
from .run import COLUMNS

ROOT = Path(__file__).resolve().parent.parent


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+modified" if dirty else "")


def _nvidia_driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def environment(device: torch.device) -> dict:
    """The machine, the versions and the date, for the CSV/JSON header and the Markdown title."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join(["python -m benchmarks"] + sys.argv[1:]),
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "pointins": _version("pointins"),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_bytes=properties.total_memory,
                    gpu_l2_bytes=properties.L2_cache_size, driver=_nvidia_driver(), cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32))
    return info


def device_label(info: dict) -> str:
    if info["device"] == "cuda":
        return f"{info['gpu']} (driver {info['driver']}, CUDA {info['cuda_runtime']})"
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    return f"{info['cpu']}, {threads} of {info['cpu_count']} cores"


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _milliseconds(seconds) -> str:
    return _number(None if seconds is None else seconds * 1e3)


def _check(row: dict) -> str:
    if row["max_rel_error"] is None:
        return "not checked" if row["verified"] is None else "failed"
    return f"{'ok' if row['verified'] else 'MISMATCH'} {row['max_rel_error']:.1e}"


def speedup_text(row: dict) -> str:
    """"1.52x (1.40–1.61)": the speedup and its spread (20th–80th percentile of round-by-round ratios); a "?"
    marks a speedup whose spread crosses 1.0x (not sure which is faster)."""
    if row["speedup"] is None:
        return "n/a"
    text = f"{row['speedup']:.2f}x"
    if row.get("speedup_p20") is not None and row["kind"] != BEST_REFERENCE and row.get("timing") == "interleaved":
        text += f" ({row['speedup_p20']:.2f}–{row['speedup_p80']:.2f})"
    return text + (" ?" if row.get("uncertain") else "")


def _row_line(row: dict) -> str:
    name = f"**{row['provider']}**" if row["kind"] == POINTINS else row["provider"]
    if row["kind"] == BEST_REFERENCE:
        name = f"*best reference ({row['best_reference']})*"
    if row["status"] != "ok":
        return f"| {row['scenario']} | {name} | {row['status']} | | | | | | | {_check(row)} |"
    spread = f"{_milliseconds(row['p20_s'])}–{_milliseconds(row['p80_s'])}"
    memory = "n/a" if row["peak_extra_bytes"] is None else _number(row["peak_extra_bytes"] / 2 ** 20)
    return (f"| {row['scenario']} | {name} | {_milliseconds(row['median_s'])} | {spread} | {_number(row['tflops'])} "
            f"| {_number(row['gbps'])} | {_number(row['roofline_pct'])} | {memory} | {speedup_text(row)} "
            f"| {_check(row)} |")


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(rows: list[dict]) -> list[dict]:
    """Per pointins backend, dtype and mode: geometric-mean and minimum speedup over the best reference across
    the scenarios where both were timed (with the geometric means of the rows' 20th and 80th percentile
    speedups), the scenarios whose speedup spread crosses 1.0x, and the mean % of roofline on the pointins-*
    scenarios."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["kind"] == POINTINS and row["status"] == "ok" and row["speedup"] is not None:
            groups.setdefault((row["provider"], row["dtype"], row["mode"]), []).append(row)
    lines = []
    for (provider, dtype, mode), group in groups.items():
        worst = min(group, key=lambda row: row["speedup"])
        pointins_rows = [row["roofline_pct"] for row in group if row["scenario"].startswith("pointins-")]
        lines.append(dict(provider=provider, dtype=dtype, mode=mode, scenarios=len(group),
                          geomean_speedup=geometric_mean([row["speedup"] for row in group]),
                          geomean_speedup_p20=geometric_mean([row["speedup_p20"] for row in group]),
                          geomean_speedup_p80=geometric_mean([row["speedup_p80"] for row in group]),
                          uncertain=[row["scenario"] for row in group if row["uncertain"]],
                          min_speedup=worst["speedup"], min_speedup_scenario=worst["scenario"],
                          mean_roofline_pct_pointins=(sum(pointins_rows) / len(pointins_rows)
                                                      if pointins_rows else None)))
    return lines


def markdown(rows: list[dict], info: dict, ceilings, settings: dict) -> str:
    scale = rows[0]["scale"] if rows else "?"
    ceiling_text = ", ".join(f"{dtype} {rate / 1e12:.3g} TFLOP/s" for dtype, rate in
                             ceilings.matmul_flops_per_s.items())
    out = [
        f"## instance_aware_conv benchmarks: {info['device']}, {scale} scale",
        "",
        *(["*Quick mode: tiny shapes, one call each. It checks the harness; its numbers are not a benchmark.*", ""]
          if scale == "quick" else []),
        f"{device_label(info)}; {info['date_utc']}; torch {info['torch']}, triton {info['triton']}, "
        f"pointins {info['pointins']} (git {info['git_commit']}); `{info['command']}`",
        "",
        f"Ceilings measured in this run: copy {ceilings.copy_bytes_per_s / 1e9:.3g} GB/s "
        f"({ceilings.copy_size_bytes >> 20} MiB copy, bytes read + written); matmul ({ceilings.matmul_size}^3) "
        f"{ceiling_text}. Timing: {settings['timing']}. Peak extra memory: {settings['memory']}.",
        "",
    ]
    lines = summary(rows)
    if lines:
        out += ["### Speedup of each pointins backend over the best reference", "",
                "Speedups are medians of interleaved timings; in brackets the geometric means of the rows' 20th and "
                "80th percentile round-by-round ratios. *Uncertain*: rows whose spread crosses 1.0x (marked ? below).",
                "",
                "| backend | dtype | mode | geomean speedup (p20–p80) | min speedup (scenario) | uncertain "
                "| mean % roofline, pointins-* |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {line['provider']} | {line['dtype']} | {line['mode']} | {line['geomean_speedup']:.2f}x "
                f"({line['geomean_speedup_p20']:.2f}–{line['geomean_speedup_p80']:.2f}) "
                f"| {line['min_speedup']:.2f}x ({line['min_speedup_scenario']}) "
                f"| {', '.join(line['uncertain']) or 'none'} "
                f"| {_number(line['mean_roofline_pct_pointins'])} |" for line in lines]
        out.append("")
    sections: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["kind"] != MODEL and not is_fixed_cost(row):
            sections.setdefault((row["dtype"], row["mode"]), []).append(row)
    for (dtype, mode), section in sections.items():
        out += [f"### {dtype}, {mode}", "",
                "| scenario | provider | median ms | p20–p80 ms | TFLOP/s | GB/s | % roofline | extra MiB | speedup "
                "| check (rel. error) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        out += [_row_line(row) for row in section]
        out.append("")
    fixed_rows = [row for row in rows if is_fixed_cost(row)]
    if fixed_rows:
        out += [f"### Fixed cost of one call (float32, {TINY.describe()})", "",
                "| provider | mode | median µs | p20–p80 µs | speedup | check (rel. error) |", "|---|---|---|---|---|---|"]
        for row in fixed_rows:
            name = f"**{row['provider']}**" if row["kind"].endswith(POINTINS) else row["provider"]
            if row["status"] != "ok":
                out.append(f"| {name} | {row['mode']} | {row['status']} | | | {_check(row)} |")
                continue
            out.append(f"| {name} | {row['mode']} | {_number(row['median_s'] * 1e6)} | "
                       f"{_number(row['p20_s'] * 1e6)}–{_number(row['p80_s'] * 1e6)} | {speedup_text(row)} | "
                       f"{_check(row)} |")
        out.append("")
    model_rows = [row for row in rows if row["kind"] == MODEL]
    out += [f"### Model level: PointINS mask branch (model: {settings['model']})", ""]
    if model_rows:
        out += ["| row | dtype | mode | backend | median ms | p20–p80 ms | extra MiB | speedup over backend='torch' "
                "| check (rel. error) |", "|---|---|---|---|---|---|---|---|---|"]
        out += [_model_line(row) for row in model_rows]
    out.append("")
    return "\n".join(out)


def _model_line(row: dict) -> str:
    head = f"| {row['scenario']} | {row['dtype']} | {row['mode']} | {row['provider']} |"
    if row["status"] != "ok":
        return f"{head} {row['status']} | | | | {_check(row)} |"
    memory = "n/a" if row["peak_extra_bytes"] is None else _number(row["peak_extra_bytes"] / 2 ** 20)
    speedup = speedup_text(row)
    return (f"{head} {_milliseconds(row['median_s'])} | {_milliseconds(row['p20_s'])}–{_milliseconds(row['p80_s'])} "
            f"| {memory} | {speedup} | {_check(row)} |")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})


def write_json(rows: list[dict], info: dict, ceilings, settings: dict, scenarios: list, path: Path) -> None:
    document = {
        "environment": info,
        "settings": settings,
        "ceilings": {"copy_bytes_per_s": ceilings.copy_bytes_per_s, "copy_size_bytes": ceilings.copy_size_bytes,
                     "matmul_flops_per_s": ceilings.matmul_flops_per_s, "matmul_size": ceilings.matmul_size},
        "scenarios": {s.name: dict(templates=s.templates_shape, weight=s.weight_shape, output=s.output_shape,
                                   bias=s.bias, padding=s.padding, groups=s.groups, index=s.index, models=s.models)
                      for s in scenarios},
        "summary": summary(rows),
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(document, f, indent=1)


def write_plot(rows: list[dict], info: dict, directory: Path) -> list[Path]:
    """One PNG per dtype: speedup over the best reference (top) and % of roofline (bottom), per scenario and
    mode. Returns the files written; none (with a message) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("benchmarks: matplotlib is not installed; skipping the plot (pip install matplotlib)",
              file=sys.stderr)
        return []
    written = []
    for dtype in dict.fromkeys(row["dtype"] for row in rows):
        timed = [row for row in rows if row["dtype"] == dtype and row["status"] == "ok"
                 and row["kind"] not in (BEST_REFERENCE, MODEL) and not is_fixed_cost(row)]
        if not timed:
            continue
        modes = list(dict.fromkeys(row["mode"] for row in timed))
        scenarios = list(dict.fromkeys(row["scenario"] for row in timed))
        providers = list(dict.fromkeys(row["provider"] for row in timed))
        figure, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
        width = 0.8 / len(providers)
        for column, mode in enumerate(modes):
            for line, (metric, label) in enumerate((("speedup", "speedup over best reference"),
                                                    ("roofline_pct", "% of roofline"))):
                axis = axes[line][column]
                for k, provider in enumerate(providers):
                    values = {row["scenario"]: row[metric] for row in timed
                              if row["mode"] == mode and row["provider"] == provider}
                    axis.bar([i + k * width for i in range(len(scenarios))],
                             [values.get(name, 0) for name in scenarios], width, label=provider)
                if metric == "speedup":
                    axis.set_yscale("log")
                    axis.axhline(1.0, color="black", linewidth=0.8)
                axis.set_xticks([i + 0.4 - width / 2 for i in range(len(scenarios))], scenarios, rotation=30,
                                ha="right", fontsize=8)
                axis.set_ylabel(label)
                axis.set_title(f"{mode}")
        axes[0][0].legend(fontsize=8)
        figure.suptitle(f"instance_aware_conv, {dtype}: {device_label(info)}, {info['date_utc']}", fontsize=10)
        figure.tight_layout()
        path = directory / f"plot_{dtype}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
