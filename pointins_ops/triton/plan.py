"""How each launch is shaped: the path (tensor-core GEMM or direct), the tiles, the splits, the grids and the
autotuning candidates, all decided on the host from sizes and strides alone.

Two rules keep results bitwise reproducible whatever config autotuning picks:

* Everything that decides the order in which an output element sums its terms is chosen here from the shape,
  never tuned: the reduction chunks (channels per step, rows per step of grad_templates, pixels per step of
  grad_weight), the grad_weight split, and the config of any kernel that reduces with ``tl.sum``.
* The autotuned parameter only moves work between programs: an output tile width (pixels per program of the
  forward and of grad_templates); warps follow from the tile by rule (Operands.warps). Every reduction in an
  autotuned kernel is a chain of dots (common.py), whose order along the reduced axis is the loop order.

Sizes may be symbolic under torch.compile: tile sizes are read from size hints without guards (they only change
speed), so one compiled graph serves every instance count; what correctness depends on (alignment promises,
whether grad_weight splits) is tested on the symbolic sizes, which makes it a guard.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton

from .._registration import output_shape

# Programs to aim for: four per streaming multiprocessor of an H100 / H200 (132). A constant, not read from the
# device, so that the grad_weight split (which fixes a summation order) is the same on every GPU.
TARGET_PROGRAMS = 4 * 132
# A template whose pixels fit one tile of this many takes the fused backward: one launch, one read of
# grad_output per row block, and no partial sums.
MAX_FUSED_PIXELS = 256
# Tensor-core tiles need 16 along each dimension.
MIN_DOT = 16
# float32 accumulator elements per program: 64 registers per thread at 8 warps (the rest hold operands).
MAX_ACC = 16384
# grad_weight partial sums (float32) beyond this many bytes take fewer, longer splits.
MAX_PARTIAL_BYTES = 16 << 20
INT32_MAX = 2**31 - 1


def cdiv(a, b):
    """ceil(a / b) for ints and SymInts (triton.cdiv is a jit function, slow to call from Python)."""
    return -(-a // b)


def next_pow2(value: int) -> int:
    return 1 << max(int(value) - 1, 0).bit_length()


def size_hint(size) -> int:
    """A size's value, read without a guard where torch.compile made it symbolic: tile sizes only change speed,
    so one compiled graph keeps serving every instance count instead of recompiling for each."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    from torch.fx.experimental import symbolic_shapes

    optimization_hint = getattr(symbolic_shapes, "optimization_hint", None)  # torch >= 2.10
    if optimization_hint is not None:
        return optimization_hint(size, fallback=64)
    return symbolic_shapes.hint_int(size, fallback=64)


def pow2_between(value, low: int, high: int) -> int:
    return max(low, min(high, next_pow2(max(size_hint(value), 1))))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The op's sizes. Entries may be SymInts under torch.compile; plan decisions read them through hints."""
    P: int
    C_in: int
    H: int
    W: int
    N: int
    C_out: int
    G: int          # groups
    Cg: int         # input channels per group
    R: int          # output channels per group: the rows each instance adds to its template's GEMM
    kH: int
    kW: int
    H_out: int
    W_out: int
    stride: tuple
    padding: tuple
    dilation: tuple
    identity: bool  # no index: instance n uses template n

    @property
    def taps(self) -> int:
        return self.kH * self.kW

    @property
    def pixels(self):
        return self.H * self.W

    @property
    def out_pixels(self):
        return self.H_out * self.W_out

    @property
    def templates_in_grid(self):
        """Templates the grids cover: the P templates, plus the sentinel P of out-of-range indices."""
        return self.P if self.identity else self.P + 1

    def hint(self, name: str) -> int:
        return size_hint(getattr(self, name))

    def average_rows(self) -> int:
        """Rows (instances x output channels of a group) per used template, on average: the row-block size."""
        N, P = self.hint("N"), self.hint("P")
        return max(1, math.ceil(N * self.hint("R") / max(min(N, P), 1)))

    def average_instances(self) -> int:
        N, P = self.hint("N"), self.hint("P")
        return max(1, math.ceil(N / max(min(N, P), 1)))


def geometry(templates, weight, index, stride, padding, dilation, groups) -> Geometry:
    P, C_in, H, W = templates.shape
    N, C_out, Cg, kH, kW = weight.shape
    _, _, H_out, W_out = output_shape(templates, weight, stride, padding, dilation)
    return Geometry(P, C_in, H, W, N, C_out, groups, Cg, C_out // groups, kH, kW, H_out, W_out, tuple(stride),
                    tuple(padding), tuple(dilation), index is None)


FORCE_PATH = None  # tests set "gemm" or "direct" to run one path on every shape


def uses_direct_path(geom: Geometry) -> bool:
    """Depthwise and other many small groups: a tensor-core tile would hold mostly zeros (a few channels per tap
    and a few rows per group), so the direct multiply-add kernels serve them, vectorised across groups."""
    if FORCE_PATH is not None:
        return FORCE_PATH == "direct"
    return geom.G >= 4 and geom.hint("Cg") * geom.hint("R") <= 16


def small_templates(geom: Geometry) -> bool:
    """Templates whose pixels (and output pixels) fit one tile: one program per template covers them."""
    return geom.hint("pixels") <= MAX_FUSED_PIXELS and geom.hint("out_pixels") <= MAX_FUSED_PIXELS


def contiguous_taps(geom: Geometry, tensor_strides) -> bool:
    """Whether a tap is a constant shift of the flat pixel index: unit stride and dilation, output rows as wide
    as the template's, pixels contiguous in ``tensor_strides`` (the (h, w) strides of the tensor read)."""
    return (geom.stride == (1, 1) and geom.dilation == (1, 1) and geom.hint("W_out") == geom.hint("W")
            and tuple(size_hint(s) for s in tensor_strides) == (geom.hint("W"), 1))


def alignment(*values) -> int:
    """The largest power of 2, at most 8 elements (16 bytes of float16), dividing every value: what the kernels
    may promise with tl.multiple_of about channel and row offsets. (Under torch.compile the tests of symbolic
    sizes become guards: a graph is never reused for sizes the promise would not hold for.)"""
    align = 8
    for value in values:
        while align > 1 and value % align != 0:
            align //= 2
    return align


def no_bounds(geom: Geometry) -> bool:
    """A 1x1 kernel without padding: every tap reads inside the template, no bounds tests needed."""
    return (geom.kH, geom.kW) == (1, 1) and geom.padding == (0, 0)


def tensor_alignment(*tensors) -> int:
    """alignment() of the tensors' channel strides and storage offsets (allocations are 16-byte aligned)."""
    values = []
    for tensor in tensors:
        values.append(tensor.storage_offset())
        values.extend(tensor.stride()[:2])
    return alignment(*values)


def _largest_offset(tensor: torch.Tensor) -> int:
    return sum((size_hint(size) - 1) * abs(size_hint(stride))
               for size, stride in zip(tensor.shape, tensor.stride()) if size_hint(size) > 0)


FORCE_64BIT_OFFSETS = False  # tests set this to run the 64-bit code path on small tensors


def needs_64bit_offsets(*tensors, extra_elements: int = 0) -> bool:
    """Whether any of the tensors (or a tensor of extra_elements) has offsets past 2^31 - 1."""
    return FORCE_64BIT_OFFSETS or extra_elements > INT32_MAX or any(
        tensor is not None and (size_hint(tensor.numel()) > INT32_MAX or _largest_offset(tensor) > INT32_MAX)
        for tensor in tensors)


# -------------------------------------------------------------------------------------------------------------
# Tiles and grids
# -------------------------------------------------------------------------------------------------------------


def _no_arguments(meta) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: its arguments fixed by the shape (tiles, splits), the autotuning candidates (the first is
    the default: what runs without autotuning and under capture), and the grid and arguments that depend on the
    chosen candidate's tile sizes."""
    constants: dict
    candidates: list                 # of triton.Config
    grid: object                     # callable(config kwargs) -> grid tuple
    arguments: object = _no_arguments  # callable(config kwargs) -> more kernel arguments


@dataclasses.dataclass(frozen=True)
class Operands:
    """What a launch's dots multiply, which decides how large a tile fits in registers: "16-bit" (float16 and
    bfloat16 on tensor cores), "tf32" (float32 on tensor cores, twice the operand bytes), "ieee" (float32 FMA
    loops, which keep their operand tiles in registers); ``wide`` offsets take twice the index registers."""
    kind: str
    wide: bool = False

    @classmethod
    def of(cls, dtype: torch.dtype, tf32: bool, wide: bool) -> "Operands":
        return cls("16-bit" if dtype != torch.float32 else "tf32" if tf32 else "ieee", wide)

    @property
    def budget(self) -> int:
        """float32 accumulator elements a program may hold: 64 registers per thread at 8 warps for 16-bit
        operands, half for TF32, an eighth for IEEE float32, halved again for 64-bit offsets (IEEE float32 twice:
        its 4-warp programs hold their operand tiles in registers too, and a 16 x 64 tile with 64-bit offsets spilled
        with Triton 3.6). Larger tiles spill on sm_90 (tests/test_triton.py compiles every candidate)."""
        base = {"16-bit": MAX_ACC, "tf32": MAX_ACC // 2, "ieee": MAX_ACC // 8}[self.kind]
        if not self.wide:
            return base
        return base // 4 if self.kind == "ieee" else base // 2

    def warps(self, accumulator: int) -> int:
        """Chosen by rule, not tuned: tensor-core programs take 8 warps when their accumulator exceeds a quarter of
        the budget (an eighth with 64-bit offsets, whose index vectors take registers too: a 16 x 128 forward tile
        spilled at 4 warps with Triton 3.6), else 4 (an 8-warp program with a small accumulator spills: ptxas caps
        it at 80 registers with Triton 3.6); IEEE float32 4 (at 8 warps ptxas caps its FMA-dot kernels near 128
        registers and they spill). Seen compiling for sm_90 with Triton 3.6 and 3.8."""
        if self.kind == "ieee":
            return 4
        return 8 if accumulator * (8 if self.wide else 4) > self.budget else 4

    @property
    def channels(self) -> int:
        """Input channels per reduction step, at most."""
        return MIN_DOT if self.kind == "ieee" else 64

    @property
    def template_tiles(self) -> list:
        """grad_templates' tile widths (template pixels), the autotuning candidates: those that compile for sm_90
        without spills with Triton 3.5, 3.6 and 3.8. With 64-bit offsets a 128-pixel tile spills (3.6), and for
        IEEE float32 a 64-pixel one too (3.5, which caps those programs at 72 registers)."""
        if self.kind == "ieee":
            return [32] if self.wide else [128]
        return [64] if self.wide else [128, 64]

    @property
    def fused_rows(self) -> int:
        """Rows per block of the fused backward, whose grad_output tile is an operand of two dots."""
        rows = {"16-bit": 64, "tf32": 32, "ieee": MIN_DOT}[self.kind]
        return max(MIN_DOT, rows // 2 if self.wide else rows)


def _configs(tiles: list[dict], accumulator, operands: Operands, stages=(2,)) -> list:
    """Candidates: the tiles (widths of an output dimension; the only autotuned choice), each with the warps
    Operands.warps gives its accumulator."""
    return [triton.Config(dict(tile), num_warps=operands.warps(accumulator(tile)), num_stages=s)
            for tile in tiles for s in stages]


def block_rows(geom: Geometry, columns: int, budget: int, high: int = 128) -> int:
    """Rows per block: about the rows a template holds, within the accumulator budget at ``columns`` columns."""
    return pow2_between(geom.average_rows(), MIN_DOT, max(MIN_DOT, min(high, budget // columns)))


def block_channels(geom: Geometry, operands: Operands) -> int:
    return pow2_between(geom.Cg, MIN_DOT, operands.channels)


def row_splits(geom: Geometry, rows_per_block: int, programs: int, high: int) -> int:
    """Programs per template's rows, so that a launch has about TARGET_PROGRAMS programs."""
    row_tiles = max(1, math.ceil(geom.average_rows() / rows_per_block))
    return max(1, min(row_tiles, high, math.ceil(TARGET_PROGRAMS / max(programs, 1))))


def forward_gemm_launch(geom: Geometry, operands: Operands) -> Launch:
    budget = operands.budget
    out_pixels = geom.hint("out_pixels")
    if out_pixels <= MAX_FUSED_PIXELS:  # the whole template in one tile: read once, shared by every row block
        widths = [pow2_between(out_pixels, MIN_DOT, MAX_FUSED_PIXELS)]
    else:
        widths = [128, 64]
    block_m = block_rows(geom, widths[0], budget)
    widths = [w for w in widths if block_m * w <= budget] or [budget // block_m]
    block_c = block_channels(geom, operands)
    templates = geom.hint("templates_in_grid") * geom.G
    splits = row_splits(geom, block_m, templates * cdiv(out_pixels, widths[0]), high=16)

    def grid(meta):
        return (geom.templates_in_grid * geom.G * splits * cdiv(geom.out_pixels, meta["BLOCK_N"]),)

    def arguments(meta):
        return dict(num_px_tiles=cdiv(geom.out_pixels, meta["BLOCK_N"]))

    constants = dict(BLOCK_M=block_m, BLOCK_C=block_c, row_splits=splits)
    candidates = _configs([dict(BLOCK_N=w) for w in widths], lambda tile: block_m * tile["BLOCK_N"], operands,
                          stages=(3,))
    return Launch(constants, candidates, grid, arguments)


def forward_direct_launch(geom: Geometry, wide: bool = False) -> Launch:
    out_pixels = geom.hint("out_pixels")
    block_n = pow2_between(out_pixels, 16, MAX_FUSED_PIXELS)
    block_i = pow2_between(geom.average_instances(), 1, 4)
    # [instances, groups, pixels] float32 accumulator: half the budget (the template tile is widened to float32
    # beside it); a larger one spills with Triton 3.6 on sm_90
    block_g = pow2_between(geom.G, 1, max(1, MAX_ACC // (4 if wide else 2) // (block_i * block_n)))
    group_tiles = cdiv(geom.G, block_g)
    px_tiles = cdiv(geom.out_pixels, block_n)
    templates = geom.hint("templates_in_grid")
    splits = max(1, min(math.ceil(geom.average_instances() / block_i),
                        math.ceil(TARGET_PROGRAMS / max(templates * size_hint(group_tiles) * size_hint(px_tiles), 1))))

    def grid(meta):
        return (geom.templates_in_grid * splits * group_tiles * px_tiles,)

    constants = dict(BLOCK_I=block_i, BLOCK_G=block_g, BLOCK_N=block_n, num_px_tiles=px_tiles,
                     num_group_tiles=group_tiles, instance_splits=splits)
    warps = 8 if block_i * block_g * block_n > MAX_ACC // 4 else 4
    return Launch(constants, [triton.Config({}, num_warps=warps, num_stages=1)], grid)


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    launches: list      # of (name, Launch): fused, or grad_templates then grad_weight
    splits: int         # grad_weight splits over output pixels (partials when > 1)


# Output pixels per step of the grad_weight reduction (fixed: it is a summation chunk).
GRAD_WEIGHT_PIXELS = 64


def same_pixels(geom: Geometry) -> bool:
    """Output pixel i and template pixel i are the same place (unit stride, 'same' padding): a split of the
    output pixels is then also a tile of template pixels, and one program can do both gradients on it."""
    return geom.stride == (1, 1) and geom.H_out == geom.H and geom.W_out == geom.W


def _pixel_splits(geom: Geometry, programs_per_split: int) -> tuple:
    """(splits, split length) of the output pixels for grad_weight: about TARGET_PROGRAMS programs, at least 4
    steps of GRAD_WEIGHT_PIXELS per split, and at most MAX_PARTIAL_BYTES of float32 partial sums."""
    out_pixels = geom.hint("out_pixels")
    weight_elements = geom.hint("N") * geom.hint("C_out") * geom.hint("Cg") * geom.taps
    most_splits = max(1, min(cdiv(out_pixels, 4 * GRAD_WEIGHT_PIXELS),
                             MAX_PARTIAL_BYTES // max(4 * weight_elements, 1)))
    splits = max(1, min(most_splits, math.ceil(TARGET_PROGRAMS / max(programs_per_split, 1))))
    split_len = cdiv(cdiv(out_pixels, splits), GRAD_WEIGHT_PIXELS) * GRAD_WEIGHT_PIXELS
    return cdiv(geom.out_pixels, split_len), split_len  # symbolic where the sizes are: all pixels covered


def backward_gemm_plan(geom: Geometry, operands: Operands, align: int) -> BackwardPlan:
    """grad_weight: row blocks x channel chunks x splits of the output pixels, GRAD_WEIGHT_PIXELS per step, each
    split summing its pixels in order (float32 partials when there are several); grad_templates: tiles of template
    pixels (an autotuned width), the reduction over the template's rows in blocks of BLOCK_M.

    Where output and template pixels coincide (same_pixels: every benchmark scenario) one launch does both on each
    (template, group, channel chunk, split): grad_output is read from DRAM once, by one program, and the second
    read (for grad_templates) finds it in L1/L2. Otherwise grad_templates and grad_weight are two launches."""
    budget = operands.budget
    block_c = block_channels(geom, operands)
    c_chunks = cdiv(geom.Cg, block_c)
    templates = geom.hint("templates_in_grid") * geom.G * size_hint(c_chunks)
    gt_tiles = [dict(BLOCK_PI=width) for width in operands.template_tiles]

    def gt_accumulator(tile):
        return tile["BLOCK_PI"] * block_c

    if same_pixels(geom):
        block_m = block_rows(geom, max(block_c, GRAD_WEIGHT_PIXELS), budget, high=operands.fused_rows)

        def fused_accumulator(tile):  # grad_templates' accumulator and grad_output's [rows, pixels] tile
            return gt_accumulator(tile) + block_m * GRAD_WEIGHT_PIXELS

        splits, split_len = _pixel_splits(geom, templates)
        constants = dict(DO_GT=True, DO_GW=True, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_PO=GRAD_WEIGHT_PIXELS,
                         num_c_chunks=c_chunks, num_px_tiles=splits, row_splits=1, split_len_div=split_len // align,
                         gt_len_div=split_len // align)

        def grid(meta):
            return (geom.templates_in_grid * geom.G * c_chunks * splits,)

        return BackwardPlan([("fused", Launch(constants, _configs(gt_tiles, fused_accumulator, operands), grid))],
                            splits)

    # grad_templates: the reduction runs over the template's rows in blocks of up to 64.
    gt_block_m = pow2_between(geom.average_rows(), MIN_DOT, 64)
    gt_constants = dict(DO_GT=True, DO_GW=False, BLOCK_M=gt_block_m, BLOCK_C=block_c, BLOCK_PO=MIN_DOT,
                        num_c_chunks=c_chunks, row_splits=1, split_len_div=0)

    def gt_grid(meta):
        return (geom.P * geom.G * c_chunks * cdiv(geom.pixels, meta["BLOCK_PI"]),)

    def gt_arguments(meta):
        return dict(num_px_tiles=cdiv(geom.pixels, meta["BLOCK_PI"]), gt_len_div=meta["BLOCK_PI"] // align)

    grad_templates = Launch(gt_constants, _configs(gt_tiles, gt_accumulator, operands), gt_grid, gt_arguments)

    block_m = block_rows(geom, block_c, budget)
    rows_split = row_splits(geom, block_m, templates, high=8)
    splits, split_len = _pixel_splits(geom, templates * rows_split)
    gw_constants = dict(DO_GT=False, DO_GW=True, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_PI=MIN_DOT,
                        BLOCK_PO=GRAD_WEIGHT_PIXELS, num_c_chunks=c_chunks, num_px_tiles=splits,
                        row_splits=rows_split, split_len_div=split_len // align, gt_len_div=0)

    def gw_grid(meta):
        return (geom.templates_in_grid * geom.G * c_chunks * rows_split * splits,)

    # (IEEE float32's FMA loop spills with operands of a second step in flight, with 64-bit offsets: it is
    # bound by its multiply-adds anyway)
    stages = (1,) if operands.kind == "ieee" else (3,)
    grad_weight = Launch(gw_constants, _configs([{}], lambda tile: block_m * block_c, operands, stages), gw_grid)
    return BackwardPlan([("grad_templates", grad_templates), ("grad_weight", grad_weight)], splits)


def backward_direct_plan(geom: Geometry, wide: bool = False) -> BackwardPlan:
    fused = small_templates(geom)
    block_pi = pow2_between(geom.pixels, 16, MAX_FUSED_PIXELS) if fused else MAX_FUSED_PIXELS
    block_po = pow2_between(geom.out_pixels, 16, MAX_FUSED_PIXELS) if fused else MAX_FUSED_PIXELS
    block_i = pow2_between(geom.average_instances(), 1, 4)
    # the backward holds grad_output's [instances, groups, pixels] tile in float32 and its products with the template
    # tile: a quarter of the budget each (larger spills with Triton 3.6 on sm_90)
    block_g = pow2_between(geom.G, 1, max(1, MAX_ACC // (8 if wide else 4) // (block_i * max(block_po, block_pi))))
    group_tiles = cdiv(geom.G, block_g)
    in_tiles = cdiv(geom.pixels, block_pi)
    out_tiles = cdiv(geom.out_pixels, block_po)
    px_tiles = torch.sym_max(in_tiles, out_tiles)
    constants = dict(BLOCK_I=block_i, BLOCK_G=block_g, BLOCK_PI=block_pi, BLOCK_PO=block_po,
                     num_group_tiles=group_tiles, num_px_tiles=px_tiles, num_out_tiles=out_tiles,
                     num_in_tiles=in_tiles)

    def grid(meta):
        return (geom.templates_in_grid * group_tiles * px_tiles,)

    warps = 8 if block_i * block_g * block_po > MAX_ACC // 4 else 4
    return BackwardPlan([("direct", Launch(constants, [triton.Config({}, num_warps=warps, num_stages=1)], grid))],
                        out_tiles)


PARTIAL_SUM_BLOCK = 1024
