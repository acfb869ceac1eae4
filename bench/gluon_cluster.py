"""Can this Triton exchange data between the CTAs of a thread-block cluster? Compiled for sm_90a on this machine
(no GPU needed), with Gluon (`triton.experimental.gluon`), whose layouts may split a tensor across a cluster's CTAs
(`cga_layout`, launched with `num_ctas`).

The batch-1 step's floor is its 12 exchanges between SMs, one a layer (BENCHMARKS.md, sessions 14-20). A cluster's
distributed shared memory and hardware barrier are the cheaper exchange; a cross-CTA `convert_layout` or a sum over
a CTA-split axis is how Gluon would express it. Each case below is compiled on its own, with its outcome printed:

- a copy whose tensor is split across the CTAs (no exchange);
- rows split across the CTAs, converted to columns split across them (an all-to-all);
- rows split across the CTAs, converted to every CTA holding all of them (an all-gather);
- the sum over the CTA-split axis (an all-reduce).

    python3 bench/gluon_cluster.py [--ctas 2|4|8|16]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, even where the tests' conftest would interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import CompiledKernel  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

D = 256  # values a CTA contributes: the default model's d_model
CLUSTER_PTX = ("mapa", "shared::cluster", "barrier.cluster")


def _bases(n_ctas: int, dim: int) -> list[list[int]]:
    """`cga_layout` bases splitting dimension `dim` of a 2-D tensor over `n_ctas` CTAs (in units of the split)."""
    return [[1 << i if d == dim else 0 for d in range(2)] for i in range(n_ctas.bit_length() - 1)]


def layouts(n_ctas: int) -> dict[str, gl.BlockedLayout]:
    """Three layouts of an (n_ctas, D) tensor at 4 warps: a row a CTA, D / n_ctas columns a CTA, all on every CTA."""
    return {
        "rows": gl.BlockedLayout([1, 1], [1, 32], [1, 4], [1, 0], cga_layout=_bases(n_ctas, 0)),
        "cols": gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0], cga_layout=_bases(n_ctas, 1)),
        "all": gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0], cga_layout=[[0, 0]] * (n_ctas.bit_length() - 1)),
    }


@gluon.jit
def _convert(x_ptr, y_ptr, N: gl.constexpr, D: gl.constexpr, SRC: gl.constexpr, DST: gl.constexpr):
    """y (N, D) = x, loaded in layout SRC and stored from layout DST (the same layout: a plain copy)."""
    r = gl.arange(0, N, layout=gl.SliceLayout(1, SRC))
    c = gl.arange(0, D, layout=gl.SliceLayout(0, SRC))
    x = gl.convert_layout(gl.load(x_ptr + r[:, None] * D + c[None, :]), DST)
    r2 = gl.arange(0, N, layout=gl.SliceLayout(1, DST))
    c2 = gl.arange(0, D, layout=gl.SliceLayout(0, DST))
    gl.store(y_ptr + r2[:, None] * D + c2[None, :], x)


@gluon.jit
def _sum_rows(x_ptr, y_ptr, N: gl.constexpr, D: gl.constexpr, SRC: gl.constexpr, DST: gl.constexpr):
    """y (D,) = x (N, D) summed over its rows, which SRC splits across the CTAs (DST unused)."""
    r = gl.arange(0, N, layout=gl.SliceLayout(1, SRC))
    c = gl.arange(0, D, layout=gl.SliceLayout(0, SRC))
    gl.store(y_ptr + c, gl.sum(gl.load(x_ptr + r[:, None] * D + c[None, :]), axis=0))


def _compile(source: GluonASTSource, n_ctas: int) -> tuple[CompiledKernel | None, str]:
    """`source` compiled for sm_90a with `n_ctas` CTAs a cluster, or None, and what the compiler wrote to the
    process's stderr (file descriptor 2, where MLIR writes its diagnostics)."""
    with tempfile.TemporaryFile("w+") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 4, "num_ctas": n_ctas})  # fmt: skip
        except RuntimeError:  # the MLIR pass pipeline failed
            compiled = None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return compiled, log.read()


def compile_case(kernel: JITFunction, n_ctas: int, src: gl.BlockedLayout, dst: gl.BlockedLayout) -> str:
    """The outcome of compiling `kernel` with `n_ctas` CTAs a cluster: the count of each cluster instruction in its
    PTX, or the compiler's first error."""
    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "N": "constexpr", "D": "constexpr", "SRC": "constexpr",
                 "DST": "constexpr"}  # fmt: skip
    source = GluonASTSource(kernel, signature, constexprs={(2,): n_ctas, (3,): D, (4,): src, (5,): dst})
    compiled, log = _compile(source, n_ctas)
    if compiled is None:
        first = re.search(r"error: (.*)", log)
        return f"does not compile: {first.group(1) if first else log.strip()[-300:]}"
    ptx = compiled.asm["ptx"]
    return "compiles; PTX " + ", ".join(f"{w} x{ptx.count(w)}" for w in CLUSTER_PTX)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctas", type=int, choices=(2, 4, 8, 16), default=16, help="CTAs a cluster (default: 16)")
    args = p.parse_args()
    lay = layouts(args.ctas)
    cases = [
        ("copy, split across the CTAs", _convert, lay["rows"], lay["rows"]),
        ("rows split -> columns split (all-to-all)", _convert, lay["rows"], lay["cols"]),
        ("rows split -> on every CTA (all-gather)", _convert, lay["rows"], lay["all"]),
        ("sum over the split rows (all-reduce)", _sum_rows, lay["rows"], lay["rows"]),
    ]
    print(f"triton {triton.__version__}, sm_90a, {args.ctas} CTAs a cluster, ({args.ctas}, {D}) float32", flush=True)
    for name, kernel, src, dst in cases:
        print(f"{name}: {compile_case(kernel, args.ctas, src, dst)}", flush=True)


if __name__ == "__main__":
    main()
