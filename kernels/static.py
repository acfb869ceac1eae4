"""Compile `kernels/frame_step.py`'s one-launch kernel for a GPU target on any machine, no GPU needed (Triton's
compiler and ptxas ship with Triton): the check that it compiles, and the static figures that say where its time
may go (registers, spills, `bar.sync` count, layout conversions).

Shapes: the default model's (`ModelDimensions()`: 12 layers, d_model 256, d_state 64, head_dim 64), bf16, one
stream (BLOCK_P 4, 128 programs; `block_p` 8 and 16 are the launches of 2 and 4 streams, 64 and 32 programs a
stream), with the 16-byte pointer alignment a launch finds its tensors at (without it the
weight loads are not vectorized and the kernel spills; BENCHMARKS.md, session 17).
"""

from __future__ import annotations

import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, CompiledKernel
from triton.runtime.jit import JITFunction

from kernels.frame_step import conv2_block

_CONSTS = dict(NL=12, D=256, H=8, P=64, N=64, G=1, K=4, V=29, C=64, M2=20, BLOCK_J=128, BLOCK_N=64, BLOCK_K=4,
               BLOCK_V=32, BLOCK_C=64, BLOCK_M=128, SYNC=True, LOG_PROBS=True)  # fmt: skip
_BLOCK_PS = (4, 8, 16)  # `block_p_for`'s choice for 1, 2 and 4 streams on an H100 or H200 (128, 64, 32 programs)
_PAIRS = {"lin_ptr", "in_ptr", "outw_ptr", "hw_ptr"}  # weights read as packed column pairs (int32)
_FLOAT32 = {"feats_ptr", "out_ptr", "ssm_ptr", "acc_ptr"}


def _arg_type(name: str, consts: dict) -> str:
    if name in consts:
        return "constexpr"
    if name == "slots_ptr":
        return "*i64"
    if name in _PAIRS or name == "bar_ptr":
        return "*i32"
    if name in _FLOAT32:
        return "*fp32"
    if name.endswith("_ptr"):
        return "*bf16"
    return "fp32" if name == "eps" else "i32"


def compile_frame_kernel(kernel: JITFunction, num_warps: int, capability: int = 90, block_p: int = 4) -> CompiledKernel:
    """`_frame_kernel` (or a variant's, same arguments) compiled for sm_`capability` at the default shapes, with
    `block_p` state rows a program (4, 8 or 16: `frame_step`'s choice for 1, 2 or 4 streams on an H100 or H200)."""
    if block_p not in _BLOCK_PS:
        raise ValueError(f"block_p must be one of {list(_BLOCK_PS)}, got {block_p}")
    n_programs = _CONSTS["H"] * triton.cdiv(_CONSTS["P"], block_p)
    consts = {**_CONSTS, "BLOCK_P": block_p, "CB": conv2_block(_CONSTS["C"], _CONSTS["M2"], n_programs)}
    names = kernel.arg_names
    signature = {n: _arg_type(n, consts) for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr")}
    constexprs = {(names.index(c),): v for c, v in consts.items()}
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def ptxas_usage(compiled: CompiledKernel, capability: int = 90) -> str:
    """ptxas's line on registers and spills for the compiled kernel's PTX (sm_`capability`a)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        cmd = [get_ptxas(capability).path, "-v", f"--gpu-name=sm_{capability}a", f.name, "-o", "/dev/null"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return " ".join(line.split(":", 1)[-1].strip() for line in done.stderr.splitlines() if "registers" in line
                    or "spill" in line)  # fmt: skip


def conversions(compiled: CompiledKernel) -> list[str]:
    """The TTGIR's `convert_layout` ops, each as its source lines (innermost call first, `<-` its callers) and the
    converted tensor's type."""
    ir = compiled.asm["ttgir"]
    files = dict(re.findall(r'^(#loc\d+) = loc\("[^"]*":(\d+):\d+\)', ir, re.M))
    named = dict(re.findall(r'^(#loc\d+) = loc\("[^"]*"\((#loc\d+)\)\)', ir, re.M))
    sites = re.findall(r"^(#loc\d+) = loc\(callsite\((#loc\d+) at (#loc\d+)\)\)", ir, re.M)
    calls = {loc: (callee, caller) for loc, callee, caller in sites}

    def where(loc: str) -> str:
        if loc in files:
            return files[loc]
        if loc in named:
            return where(named[loc])
        if loc in calls:
            return f"{where(calls[loc][0])}<-{where(calls[loc][1])}"
        return loc

    found = re.finditer(r"ttg\.convert_layout %\S+ : (tensor<[^>]*>)[^\n]*loc\((#loc\d+)\)", ir)
    return [f"{where(m.group(2))} {m.group(1)}" for m in found]
