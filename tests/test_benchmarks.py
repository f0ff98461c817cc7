"""The benchmark harness (``python -m benchmarks``) in quick mode: tiny shapes, one repetition.

It checks the harness, not the speed: every row of the table is complete, every provider's output was checked
against the float64 reference before it was timed, and a provider that is wrong is reported, not timed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# `benchmarks` is a folder of the repository (run as `python -m benchmarks` from its root), not installed.
sys.path.insert(0, str(ROOT))

from benchmarks import measure  # noqa: E402
from benchmarks.providers import BEST_REFERENCE, POINTINS, REFERENCE, Provider, make_providers  # noqa: E402
from benchmarks.run import COLUMNS, TIMED_COLUMNS, Config, run  # noqa: E402
from benchmarks.scenarios import MODES, SCENARIOS  # noqa: E402
from pointins_ops import available_backends  # noqa: E402
from pointins_ops.reference import FORMULATIONS  # noqa: E402

DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run of the command as users type it; its stdout and the files it wrote."""
    out = tmp_path_factory.mktemp("benchmarks")
    # conftest.py turns on Triton's interpreter for the kernel tests; the benchmarks never time it, and a
    # user's shell would not have it set.
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    process = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--out", str(out)],
                             cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    document = json.loads((out / "results.json").read_text())
    return dict(out=out, stdout=process.stdout, stderr=process.stderr, document=document,
                rows=document["rows"])


def _operator_rows(rows):
    return [row for row in rows if row["kind"] in (POINTINS, REFERENCE, BEST_REFERENCE)]


def test_every_provider_has_a_row_per_scenario_dtype_and_mode(quick):
    # Every compiled CPU backend; not "torch" (it is one of the references) nor Triton's interpreter.
    backends = [name for name in available_backends("cpu") if name not in ("torch", "triton")]
    assert quick["document"]["settings"]["backends"] == backends
    rows = _operator_rows(quick["rows"])
    seen = {(row["scenario"], row["dtype"], row["mode"], row["provider"]) for row in rows}
    for scenario in SCENARIOS.values():
        references = [name for name in FORMULATIONS if name != "einsum_1x1" or scenario.kernel == 1]
        for dtype in DTYPES:
            for mode in MODES:
                for provider in backends + references + [BEST_REFERENCE]:
                    assert (scenario.name, dtype, mode, provider) in seen
    assert len(seen) == len(rows), "duplicate rows"


def test_every_row_is_complete_and_was_checked_before_it_was_timed(quick):
    rows = _operator_rows(quick["rows"])
    for row in rows:
        where = f"{row['scenario']} {row['dtype']} {row['mode']} {row['provider']}"
        assert row["status"] == "ok", where
        assert row["verified"] is True, where
        assert row["max_rel_error"] <= measure.VERIFY_TOL[getattr(torch, row["dtype"])], where
        for column in TIMED_COLUMNS + ["flops", "min_bytes", "samples", "peak_extra_bytes"]:
            assert row[column] is not None, f"{where}: {column}"
        for column in ("median_s", "p20_s", "p80_s", "tflops", "gbps", "roofline_pct", "speedup"):
            assert math.isfinite(row[column]) and row[column] > 0, f"{where}: {column} = {row[column]}"
        assert row["p20_s"] <= row["median_s"] <= row["p80_s"], where
        assert row["peak_extra_bytes"] >= 0, where
        assert row["best_reference"] in FORMULATIONS, where


def test_best_reference_is_the_fastest_reference(quick):
    rows = _operator_rows(quick["rows"])
    groups = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["dtype"], row["mode"]), []).append(row)
    for group in groups.values():
        best = next(row for row in group if row["kind"] == BEST_REFERENCE)
        references = [row for row in group if row["kind"] == REFERENCE]
        assert best["median_s"] == min(row["median_s"] for row in references)
        assert best["speedup"] == 1.0
        for row in group:
            assert row["speedup"] == pytest.approx(best["median_s"] / row["median_s"], rel=1e-12)


def test_model_rows_when_the_model_package_provides_the_mask_branch(quick):
    status = quick["document"]["settings"]["model"]
    model_rows = [row for row in quick["rows"] if row["kind"] == "model"]
    if status != "measured":
        assert not model_rows
        pytest.skip(f"model rows not run: {status}")
    assert {row["scenario"] for row in model_rows} == {"mask-branch-train", "mask-branch-infer"}
    for row in model_rows:
        assert row["status"] == "ok" and row["verified"] is True, row
        assert row["median_s"] > 0 and row["speedup"] > 0 and row["peak_extra_bytes"] is not None, row


def test_fixed_cost_rows_time_every_provider_on_a_tiny_problem(quick):
    rows = [row for row in quick["rows"] if row["kind"].startswith("fixed-cost")]
    backends = [name for name in available_backends("cpu") if name not in ("torch", "triton")]
    assert {(row["provider"], row["mode"]) for row in rows} == {
        (name, mode) for name in backends + [f for f in FORMULATIONS if f != "einsum_1x1"]
        for mode in ("forward", "forward+backward")}
    for row in rows:
        assert row["status"] == "ok" and row["verified"] is True, row
        assert row["median_s"] > 0 and row["speedup"] > 0, row
    assert "### Fixed cost of one call" in quick["stdout"]


def test_markdown_table_on_stdout_has_every_row_filled(quick):
    lines = [line for line in quick["stdout"].splitlines() if line.startswith("| ") and "---" not in line]
    table = [line for line in lines if line.count("|") == 11 and not line.startswith("| scenario |")]
    assert len(table) == len(_operator_rows(quick["rows"]))
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert all(cells), line
        assert cells[-1].startswith("ok "), line


def test_csv_and_json_keep_full_precision_and_the_environment(quick):
    with open(quick["out"] / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0]) == COLUMNS
    assert len(csv_rows) == len(quick["rows"])
    for from_csv, from_json in zip(csv_rows, quick["rows"]):
        for column in ("median_s", "p20_s", "tflops", "roofline_pct", "max_rel_error"):
            if from_json[column] is not None:
                assert float(from_csv[column]) == from_json[column]  # exact: repr round-trips
    environment = quick["document"]["environment"]
    for key in ("date_utc", "cpu", "threads", "torch", "triton", "pointins", "git_commit"):
        assert environment[key] not in (None, ""), key
    assert set(quick["document"]["scenarios"]) == set(SCENARIOS)
    ceilings = quick["document"]["ceilings"]
    assert ceilings["copy_bytes_per_s"] > 0 and set(ceilings["matmul_flops_per_s"]) == set(DTYPES)
    assert (quick["out"] / "results.md").read_text().strip() == quick["stdout"].strip()


def test_plot_or_a_message_saying_why_not(quick):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in quick["stderr"]
    else:
        for dtype in DTYPES:
            assert (quick["out"] / f"plot_{dtype}.png").stat().st_size > 0


def test_a_wrong_provider_is_reported_and_not_timed():
    def off_by_one_percent(templates, weight, bias=None, index=None, **conv):
        return FORMULATIONS["unfold_bmm"](templates, weight, bias, index, **conv) * 1.01

    device = torch.device("cpu")
    providers = make_providers(device, backends=[], references=["unfold_bmm"])
    providers.append(Provider("wrong", POINTINS, off_by_one_percent))
    config = Config(device, "quick", [SCENARIOS["pointins-infer"]], [torch.float32], ["forward", "backward"],
                    providers, measure.TimingSettings(quick=True), progress=False)
    rows, _ = run(config)
    wrong = [row for row in rows if row["provider"] == "wrong"]
    assert len(wrong) == 2
    for row in wrong:
        assert row["verified"] is False and row["status"].startswith("mismatch")
        assert row["max_rel_error"] == pytest.approx(0.01, rel=1e-3)
        assert row["median_s"] is None and row["speedup"] is None
    assert all(row["status"] == "ok" for row in rows if row["provider"] != "wrong")


def test_operation_counts_and_scaling():
    train = SCENARIOS["pointins-train"]
    multiply_adds = 4096 * 16 * 14 * 14 * 16 * 3 * 3
    assert train.flops("forward") == 2 * multiply_adds
    assert train.flops("forward+backward") == 6 * multiply_adds
    templates, weight, bias, output = 1024 * 16 * 14 * 14, 4096 * 16 * 16 * 9, 4096 * 16, 4096 * 16 * 14 * 14
    assert train.min_bytes("forward", torch.float32) == 4 * (templates + weight + bias + output) + 8 * 4096
    assert train.min_bytes("backward", torch.bfloat16) == 2 * (output + 2 * templates + 2 * weight + bias) + 8 * 4096
    cpu = train.scaled("cpu")
    assert (cpu.P, cpu.N, cpu.C_in, cpu.H, cpu.kernel) == (64, 256, 16, 14, 3)
    condinst = SCENARIOS["condinst"].scaled("cpu")
    assert (condinst.P, condinst.N) == (1, 32)
    infer = SCENARIOS["pointins-infer"].scaled("quick")
    assert infer.N == infer.P >= 1


def test_default_output_is_a_new_run_folder_not_the_committed_tables():
    committed = ROOT / "benchmarks" / "results" / "cpu"
    before = {path.name: path.read_bytes() for path in committed.glob("*")} if committed.exists() else {}
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    process = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--no-plot",
                              "--scenario", "pointins-infer", "--dtype", "float32", "--mode", "forward"],
                             cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    folder = Path(process.stderr.strip().splitlines()[-1].removeprefix("results: "))
    assert folder.parent == ROOT / "benchmarks" / "results" / "local" and folder.name.startswith("cpu-")
    assert (folder / "results.json").exists()
    after = {path.name: path.read_bytes() for path in committed.glob("*")} if committed.exists() else {}
    assert after == before


def test_interleaved_timing_alternates_and_pairs_rounds():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    settings = measure.TimingSettings(min_block_s=0.0, min_rounds=4, max_rounds=4)
    timings = measure.time_interleaved(steps, {name: 1.0 for name in steps}, torch.device("cpu"), settings)
    # One call per block, four rounds, the order reversed every other round.
    assert calls == list("abc" "cba" "abc" "cba")
    assert all(len(timing.times_s) == 4 and timing.interleaved for timing in timings.values())


def test_speedup_spread_and_uncertainty_come_from_paired_rounds():
    from benchmarks.run import add_speedups

    baseline = measure.Timing([2.0, 2.0, 2.0, 2.0, 2.0], 1)
    clear = measure.Timing([1.0, 1.0, 1.1, 1.0, 0.9], 1)        # about 2x faster in every round
    unsure = measure.Timing([1.8, 2.2, 1.9, 2.1, 2.0], 1)       # faster in some rounds, slower in others
    rows = [dict(provider=name, kind=POINTINS, status="ok") for name in ("clear", "unsure")]
    rows.append(dict(provider="base", kind=REFERENCE, status="ok"))
    add_speedups(rows, dict(clear=clear, unsure=unsure, base=baseline), "base", "base")
    by_name = {row["provider"]: row for row in rows}
    assert by_name["clear"]["speedup"] == pytest.approx(2.0) and not by_name["clear"]["uncertain"]
    assert by_name["clear"]["speedup_p20"] > 1.0
    assert by_name["unsure"]["uncertain"] and by_name["unsure"]["speedup_p20"] < 1.0 < by_name["unsure"]["speedup_p80"]
    assert by_name["base"]["speedup"] == 1.0 and not by_name["base"]["uncertain"]


def test_cuda_estimate_costs_the_launches_the_cuda_host_code_makes():
    # benchmarks/estimate_cuda.py takes its launches from the CUDA emulation's record mode: the host code of
    # csrc/cuda/ plans, buckets and launches on empty tensors of the scenario's sizes, kernel bodies not run. The
    # record names every kernel, and a persistent grid is as large as its work: here the forward's row-tile capacity
    # (N * C_out / tile_rows + min(N, P + 1)) and the fused backward's (P + 1) units.
    from benchmarks import estimate, estimate_cuda

    train = SCENARIOS["pointins-train"]
    launches = estimate_cuda.launches(train, "bfloat16")
    plans = estimate_cuda.parse_plans(launches["plans"])
    assert [launch["kernel"].split("<")[0] for launch in launches["forward"]] == ["bucket_kernel", "conv_forward_kernel"]
    assert [launch["kernel"].split("<")[0] for launch in launches["backward"]] == ["bucket_kernel",
                                                                                 "conv_backward_kernel"]
    assert "BFloat16" in launches["forward"][1]["kernel"] and plans["backward conv"].get("fused")
    tile_rows = plans["forward conv"]["rows"]
    assert launches["forward"][1]["grid"][0] == train.N * train.C_out // tile_rows + min(train.N, train.P + 1)
    assert launches["backward"][1]["grid"][0] == train.P + 1
    assert all(launch["smem"] <= 232448 for part in ("forward", "backward") for launch in launches[part])

    kinds = {"solov2": {"bucket_kernel", "pointwise forward", "pointwise grad_weight", "sum_splits",
                        "pointwise grad_templates"},
             "pointins-dw": {"bucket_kernel", "depthwise forward", "depthwise backward"},
             "pointins-infer": {"conv_forward", "conv_backward (fused)"}}  # identity index: no bucketing
    for name, expected in kinds.items():
        records = estimate_cuda.plan(SCENARIOS[name], "forward+backward", "bfloat16")
        assert {r["kernel"] for r in records} == expected, (name, [r["kernel"] for r in records])
        for r in records:
            assert r["seconds"] >= estimate.LAUNCH_S and r["basis"] and r["programs"] >= 1, r
            assert r["kernel"] == "bucket_kernel" or r["bytes"] > 0, r
    # The issued multiply-adds are at least the useful ones (padding only adds), and float32 runs on FMA.
    for dtype in ("bfloat16", "float32"):
        records = estimate_cuda.plan(train, "forward", dtype)
        assert sum(r["flops"] for r in records) >= train.flops("forward"), dtype
    rows, note = estimate.estimate_rows([train], ["forward+backward"], ["float32"], compile_kernels=False)
    assert note == "" and {row["backend"] for row in rows} == {"triton", "cuda"}


def test_collect_gathers_each_runs_speedups(quick, tmp_path):
    from benchmarks import collect

    # A run of every scenario gives one "all" row per backend: its geomeans, dtype by dtype and mode by mode.
    table = collect.collect([quick["out"]])
    summaries = [row for row in quick["rows"] if row["kind"] == POINTINS]
    backends = {row["provider"] for row in summaries}
    assert set(table) == {("all", backend) for backend in backends}
    for (_, backend), entry in table.items():
        assert set(entry["cells"]) == {(dtype, mode) for dtype in DTYPES for mode in MODES}
        assert all(cell.endswith(("x", "x ?")) for cell in entry["cells"].values()), entry
    # One scenario per run (a GPU window's runs, concatenated as in its summary.md): a row per scenario.
    one = (quick["out"] / "results.md").read_text().replace("`python -m benchmarks ", "`python -m benchmarks "
                                                             "--scenario condinst ", 1)
    two = one.replace("--scenario condinst", "--scenario yolact", 1)
    (tmp_path / "summary.md").write_text(one + "\n" + two)
    assert {scenario for scenario, _ in collect.collect([tmp_path / "summary.md"])} == {"condinst", "yolact"}
    assert collect.main([str(tmp_path / "summary.md")]) == 0


def test_op_only_leaves_out_model_and_fixed_cost_rows(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    process = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--no-plot", "--op-only",
                              "--scenario", "pointins-dw", "--dtype", "float32", "--mode", "forward",
                              "--out", str(tmp_path)], cwd=ROOT, env=environment, capture_output=True, text=True,
                             timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows and all(row["kind"] in (POINTINS, REFERENCE, BEST_REFERENCE) for row in rows)
    assert {row["scenario"] for row in rows} == {"pointins-dw"}


def test_profile_op_times_and_profiles_one_scenario():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    backend = "cpu" if "cpu" in available_backends("cpu") else "torch"
    base = [sys.executable, "-m", "benchmarks.profile_op", "--scenario", "pointins-infer", "--backend", backend,
            "--dtype", "float32", "--mode", "forward+backward", "--device", "cpu"]
    timed = subprocess.run(base + ["--time", "0.2"], cwd=ROOT, env=environment, capture_output=True, text=True,
                           timeout=600)
    assert timed.returncode == 0, timed.stderr[-4000:]
    assert "ms per call" in timed.stdout and "pointins-infer float32 forward+backward" in timed.stdout
    profiled = subprocess.run(base + ["--calls", "2", "--torch-profiler"], cwd=ROOT, env=environment,
                              capture_output=True, text=True, timeout=600)
    assert profiled.returncode == 0, profiled.stderr[-4000:]
    assert "Self CPU time total" in profiled.stdout
    refused = subprocess.run(base + ["--time", "0"], cwd=ROOT, env=environment, capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2 and "--time must be a positive number of seconds" in refused.stderr
