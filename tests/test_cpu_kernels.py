"""The C++ CPU kernels on shapes that reach every path of their GEMM engine and direct kernels, under every
micro-kernel family this CPU can run (POINTINS_CPU_ISA lowers the choice), against the oracle.

test_ops.py runs the oracle's small random cases; those rarely fill a register block or a panel. The cases
here are sized for the engine (csrc/cpu/gemm.h): full and ragged blocks of rows, full and ragged panels of
pixels, operands read in place and packed, the 8 x 8 transposes, AMX's padding of K to 32, several pixel
tiles, several grad_weight chunks (their partial sums added in order), more rows than one product takes, and
the direct depthwise kernels with and without stride.
"""

import functools
import subprocess
import sys

import pytest
import torch

from oracle import TOL, Case, check_case, forward_and_grads
from pointins_ops import available_backends, instance_aware_conv

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="pointins_ops._C is not built")


def _isas():
    """The micro-kernel families this CPU runs, best first (each lower one can be forced)."""
    from pointins_ops import _C

    order = ["amx", "avx512bf16", "avx512", "avx2", "generic"]
    best = _C.cpu_isa()
    return order[order.index(best):]


ISAS = _isas() if "cpu" in available_backends("cpu") else []

ENGINE_CASES = {
    # 3x3, padded: shifted planes with gaps; 4 instances x 16 channels = 64 rows; K = 144 (AMX pads to 160)
    "train-like": Case(P=5, C_in=16, H=14, W=14, N=20, C_out=16, kernel=(3, 3), padding=(1, 1), seed=1),
    # 1x1: the template's own rows, read in place; 3 pixel tiles of 256 with a ragged one; grad_weight with
    # more rows than K (not transposed)
    "1x1-tiles": Case(P=2, C_in=24, H=23, W=29, N=7, C_out=12, kernel=(1, 1), seed=2),
    # K = 7 x 5 x 9 = 315 > 256: tiles of 192 pixels, odd K; ragged rows (3 x 5 = 15)
    "long-reduction": Case(P=2, C_in=7, H=17, W=19, N=5, C_out=5, kernel=(5, 9), padding=(2, 4), seed=3),
    # 70 x 70 = 4900 pixels: two grad_weight chunks whose partial sums are added in order
    "chunks": Case(P=1, C_in=8, H=70, W=70, N=3, C_out=2, kernel=(1, 1), seed=4),
    # 300 rows on one template: more than one product's 256; groups 2
    "many-rows": Case(P=2, C_in=8, H=6, W=7, N=40, C_out=16, kernel=(3, 3), padding=(1, 1), groups=2,
                      index="single", seed=5),
    # narrow output rows with wide gaps between them (W_out 2, pitch 10): short runs, whole-vector copies refused
    "narrow-rows": Case(P=2, C_in=6, H=9, W=6, N=4, C_out=4, kernel=(3, 5), padding=(1, 2), dilation=(1, 2), seed=11),
    # stride 2: im2col tiles instead of shifted planes
    "strided-im2col": Case(P=3, C_in=12, H=21, W=19, N=6, C_out=8, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                           seed=6),
    # unpadded 3x3 on contiguous planes read in place, with gaps; channels_last copied into planes
    "unpadded-3x3": Case(P=2, C_in=9, H=12, W=13, N=4, C_out=6, kernel=(3, 3), seed=7),
    "channels-last-planes": Case(P=2, C_in=9, H=12, W=13, N=4, C_out=6, kernel=(3, 3), padding=(1, 1),
                                 layout="channels_last", seed=8),
    # the row-vector forward (csrc/cpu/row_vectors.h; float32 on AVX-512, bfloat16 on AVX512-BF16, where it
    # computes fewer positions than the GEMM): 48 rows (3 vectors) by blocks of 7 pixels, the last moved back on
    # a 20-wide row; an odd channel count (bfloat16 pairs a zero channel); dilation
    "row-vectors-48": Case(P=1, C_in=5, H=6, W=20, N=3, C_out=16, kernel=(3, 3), padding=(0, 1), dilation=(2, 1),
                           index="single", seed=12),
    # 75 rows on one template: a block of 64 rows, then 11 (one vector, part empty); 3 x 5 kernel on a strided
    # view; 30 output rows of 12: a band of 21 rows and one of 9
    "row-vectors-75": Case(P=1, C_in=6, H=28, W=16, N=5, C_out=15, kernel=(3, 5), padding=(2, 0), layout="strided",
                           seed=13),
    # 1 x 1 on a 5 x 7 map (35 pixels; the GEMM computes a panel of 64): pairs of neighbouring channels, the
    # last one alone; channels_last planes
    "row-vectors-1x1": Case(P=3, C_in=17, H=5, W=7, N=7, C_out=9, kernel=(1, 1), layout="channels_last", seed=14),
    # depthwise, stride 1 (extended rows) and stride 2 (direct loops), with a channel multiplier
    "depthwise": Case(P=3, C_in=16, H=14, W=14, N=9, C_out=16, kernel=(3, 3), padding=(1, 1), groups=16, seed=9),
    "depthwise-strided": Case(P=2, C_in=4, H=13, W=11, N=5, C_out=8, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                              dilation=(2, 1), groups=4, seed=10),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", TOL, ids=str)
@pytest.mark.parametrize("name", ENGINE_CASES)
def test_engine_paths_match_conv2d(name, dtype, isa, monkeypatch):
    monkeypatch.setenv("POINTINS_CPU_ISA", isa)
    check_case(functools.partial(instance_aware_conv, backend="cpu"), ENGINE_CASES[name], dtype)


@pytest.mark.parametrize("dtype", TOL, ids=str)
def test_stale_scratch_never_reaches_results(dtype):
    # The kernels' per-thread buffers keep a previous call's values. Calls with NaN inputs on larger shapes fill
    # them with NaN; the next call must still match the oracle everywhere, so every value its products read was
    # written by that call (a column tile that ended in a row's gap read past its padded rows: stale NaN times
    # a zero gradient made grad_weight NaN). One thread, so the poisoning and the checked call share buffers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for C, H, W, N, O in ((16, 30, 30, 8, 16), (64, 14, 14, 16, 64)):
            templates = torch.full((1, C, H, W), float("nan"), dtype=dtype, requires_grad=True)
            weight = torch.full((N, O, C, 3, 5), float("nan"), dtype=dtype, requires_grad=True)
            out = instance_aware_conv(templates, weight, None, torch.zeros(N, dtype=torch.long), padding=(2, 0),
                                      backend="cpu")
            out.backward(torch.full_like(out, float("nan")))
        check_case(functools.partial(instance_aware_conv, backend="cpu"), ENGINE_CASES["row-vectors-75"], dtype)
    finally:
        torch.set_num_threads(threads)


def test_bad_isa_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("POINTINS_CPU_ISA", "avx1024")
    case = ENGINE_CASES["train-like"]
    with pytest.raises(ValueError, match="POINTINS_CPU_ISA must be one of"):
        forward_and_grads("cpu", case, torch.float32, "cpu")


_SAME_BITS = """
import sys, torch
sys.path.insert(0, {tests!r})
from oracle import forward_and_grads
from test_cpu_kernels import ENGINE_CASES
torch.set_num_threads({threads})
out = [forward_and_grads("cpu", case, dtype, "cpu") for case in ENGINE_CASES.values()
       for dtype in (torch.float32, torch.bfloat16)]
torch.save(out, {path!r})
"""


def test_bitwise_identical_across_processes_and_thread_counts(tmp_path):
    # Chunks, tiles and units are fixed by the shapes alone: one thread or two, any process, the same bits.
    tests = str(__import__("pathlib").Path(__file__).parent)
    results = []
    for run, threads in enumerate((1, 2, 2)):
        path = str(tmp_path / f"run{run}.pt")
        subprocess.run([sys.executable, "-c", _SAME_BITS.format(tests=tests, threads=threads, path=path)],
                       check=True, timeout=600)
        results.append(torch.load(path))
    for other in results[1:]:
        for first, second in zip(results[0], other):
            for a, b in zip(first, second):
                assert torch.equal(a, b)
