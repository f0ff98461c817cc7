"""The instruction mix of each CUDA kernel's hot loops, read from its machine code (SASS), and checks on it.

    python .ci/sass_mix.py LIBRARY.so [--cuobjdump PATH]

For every kernel and architecture in the library, the innermost loops that hold its math (tensor-core MMAs,
or FFMA/DFMA for the float32/float64 paths) are found from the backward branches of the SASS, and their
instructions counted: MMAs, ldmatrix (LDSM), async copies (LDGSTS), other shared and global accesses, barriers,
and everything else ("other"), with other instructions per MMA. It fails when a kernel that should multiply on
tensor cores has no MMA in a loop, when a kernel that should stage through cp.async has no LDGSTS, or when a
kernel's math path is missing. This is static evidence only: it says what the hot loop executes per MMA, not
how fast it runs.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys

FUNCTION = re.compile(r"^\s*Function : (\S+)")
ARCH = re.compile(r"^\s*arch = (sm_\d+a?)")
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")

# Which kernels must show what (a substring of the demangled name -> required instruction classes).
EXPECT = [
    ("TensorCoreMath", ("mma",)),
    ("FfmaMath", ("fma",)),
    ("conv_forward_kernel", ("ldgsts",)),
    ("conv_backward_kernel", ("ldgsts",)),
    ("pointwise", ("ldgsts",)),
]


def classify(opcode: str) -> str:
    op = opcode.split()[0]
    if op.startswith("@"):
        op = opcode.split()[1]
    base = op.split(".")[0]
    if base in ("HMMA", "IMMA", "DMMA", "HGMMA", "QGMMA"):
        return "mma"
    if base == "LDSM":
        return "ldsm"
    if base in ("LDGSTS", "LDGDEPBAR", "DEPBAR"):
        return "ldgsts" if base == "LDGSTS" else "async-wait"
    if base in ("LDS", "STS"):
        return "shared"
    if base in ("LDG", "STG", "LD", "ST"):
        return "global"
    if base in ("LDL", "STL"):
        return "local"
    if base in ("FFMA", "DFMA"):
        return "fma"
    if base == "BAR":
        return "barrier"
    return "other"


def parse(text: str):
    """{(kernel, arch): [(address, opcode), ...]} from cuobjdump -sass output."""
    kernels, current, arch = {}, None, "?"
    for line in text.splitlines():
        if m := ARCH.match(line):
            arch = m.group(1)
        if m := FUNCTION.match(line):
            current = (m.group(1), arch)
            kernels[current] = []
            continue
        if current is not None and (m := INSTRUCTION.match(line)):
            kernels[current].append((int(m.group(1), 16), m.group(2)))
    return kernels


def loops(instructions):
    """(start, end) address ranges of the loops: a branch back to an earlier address."""
    found = []
    for address, opcode in instructions:
        m = BRANCH.match(opcode)
        if m and m.group(1) is not None:
            target = int(m.group(1), 16)
            if target <= address:
                found.append((target, address))
    return found


def hot_loops(instructions, math: str):
    """The innermost loops holding `math` instructions, each with its counts by class."""
    ranges = loops(instructions)
    result = []
    for start, end in ranges:
        inner = [r for r in ranges if r != (start, end) and start <= r[0] and r[1] <= end]
        body = [op for address, op in instructions if start <= address <= end]
        counts = collections.Counter(classify(op) for op in body)
        if counts[math] == 0:
            continue
        if any(sum(1 for a, op in instructions if s <= a <= e and classify(op) == math) for s, e in inner):
            continue  # not innermost: a loop inside it holds the math
        result.append((start, end, len(body), counts))
    return result


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return list(names)


def short_name(pretty: str) -> str:
    m = re.search(r"(\w+<[^()]*>)\(", pretty)
    name = m.group(1) if m else pretty
    name = re.sub(r"pointins_ops::cuda::(\(anonymous namespace\)::)?", "", name)
    name = name.replace("c10::", "").replace("TensorCoreMath<", "TC<").replace("FfmaMath<", "FFMA<")
    return name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library")
    parser.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = parser.parse_args(argv)
    text = subprocess.run([args.cuobjdump, "-sass", args.library], capture_output=True, text=True, check=True).stdout
    kernels = parse(text)
    if not kernels:
        print("sass_mix: no kernels found in", args.library)
        return 1
    names = sorted(kernels)
    pretty = dict(zip(names, demangle([n for n, _ in names])))
    failures = []
    header = f"{'kernel':<58} {'arch':<6} {'loop':>11} {'instr':>5} {'mma':>4} {'ldsm':>4} {'ldgsts':>6} " \
             f"{'lds/sts':>7} {'ldg/stg':>7} {'fma':>4} {'bar':>3} {'other':>5} {'other/mma':>9}"
    print(header)
    for key in names:
        name, arch = key
        full = pretty[key]
        label = short_name(full)[:58]
        wanted = [need for marker, needs in EXPECT if marker in full for need in needs]
        math = "mma" if "mma" in wanted else "fma"
        loops_found = hot_loops(kernels[key], math)
        if not loops_found:
            extra = hot_loops(kernels[key], "ldgsts") if "ldgsts" in wanted else []
            print(f"{label:<58} {arch:<6} {'-':>11} {len(kernels[key]):>5}  (no loop with {math})")
            if wanted and ("mma" in wanted or "fma" in wanted):
                failures.append(f"{label} on {arch}: no {math.upper()} instruction in any loop")
            if "ldgsts" in wanted and not extra:
                failures.append(f"{label} on {arch}: no LDGSTS (cp.async) in any loop")
            continue
        total = collections.Counter()
        for start, end, size, counts in loops_found:
            total.update(counts)
            per = "" if counts["mma"] == 0 else f"{counts['other'] / counts['mma']:9.1f}"
            print(f"{label:<58} {arch:<6} {start:>5x}-{end:<5x} {size:>5} {counts['mma']:>4} {counts['ldsm']:>4} "
                  f"{counts['ldgsts']:>6} {counts['shared']:>7} {counts['global']:>7} {counts['fma']:>4} "
                  f"{counts['barrier']:>3} {counts['other']:>5} {per:>9}")
            label = ""
        if "ldgsts" in wanted:
            anywhere = sum(1 for _, op in kernels[key] if classify(op) == "ldgsts")
            if anywhere == 0:
                failures.append(f"{short_name(full)} on {arch}: no LDGSTS (cp.async) at all")
        if any(classify(op) == "local" for _, op in kernels[key]):
            failures.append(f"{short_name(full)} on {arch}: local-memory loads/stores (LDL/STL)")
    if failures:
        print("sass_mix: FAILED\n  " + "\n  ".join(failures))
        return 1
    print(f"sass_mix: {len(kernels)} kernel builds checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
