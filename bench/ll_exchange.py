"""What one exchange between the programs of a persistent launch costs on the GPU: the step that every layer of a
one-launch encoder step needs (each program adds its share of out_proj; every program needs the sum).

NP programs (one an SM) run `--rounds` rounds. In each, every program contributes W float32 values and reads back
the sum over all programs, by one of two mechanisms:
  * "barrier": `kernels/encoder_step.py`'s: the values added into float32 accumulators by relaxed atomics, then a
    grid barrier (a counter: release add, acquire poll), then the accumulators read;
  * "ll": NCCL's low-latency protocol: each value written as a 64-bit word holding the value and a 32-bit flag of
    the round (one strong store each, no fence, no atomic), each program polling all NP x W words (volatile
    loads) until every flag is this round's, then summing them.
Each program checks its sums (a wrong sum fails the run). The time a round is the GPU time of `--calls` launches
(CUDA events) over calls x rounds, after as many untimed launches; it includes a share of each launch's start and
of two memsets (the barrier's accumulators and counters, zeroed before every launch in both modes, so that both
carry the same overhead). A round here holds no other work, so it is the exchange's own latency.

    python3 bench/ll_exchange.py [--programs 8 16 32] [--widths 16 256] [--warps 4]

The poll loop's condition must be the same in every thread of a program (threads that leave it at different
times deadlock at the next CTA barrier), so the polled tiles must not be replicated across threads: the script
takes at most one warp for each 128 elements of the (NP, W) tile (up to 4 a thread), in both mechanisms. Below
128 elements one warp remains, which may still hold copies within the warp: the smallest rows of the table rest on
the sums' check passing, not on this rule.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from kernels.encoder_step import _arrive, _wait


@triton.jit
def _flag(epoch, r, ROUNDS: tl.constexpr):
    return (epoch * ROUNDS + r + 1) & 0xFFFFFFFF


@triton.jit
def _pack(v, flag):
    return (v.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF) | (flag << 32)


@triton.jit
def _put(ptr, words):
    """Strong stores (relaxed, GPU scope): what the PTX memory model requires for another SM's poll to be sure to
    see them (plain stores were not tried again once the deadlock below was understood)."""
    tl.inline_asm_elementwise(
        "st.relaxed.gpu.global.b64 [$1], $2;\n\tmov.b32 $0, 0;",
        "=r,l,l",
        [ptr.to(tl.int64, bitcast=True), words],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _stale(words, mask, flag):
    """Zero iff every word (where mask) carries the flag (a max of integers; a first version counted booleans and
    gave wrong sums, which the replicated tiles explained as well: not isolated)."""
    return tl.max(tl.max(tl.where(mask, ((words >> 32) & 0xFFFFFFFF) ^ flag, 0), axis=1))


@triton.jit
def _ll_sum(rows_ptr, flag, NP: tl.constexpr, BLOCK_Q: tl.constexpr, W: tl.constexpr):
    qq = tl.arange(0, BLOCK_Q)[:, None]
    mask = qq < NP
    ptr = rows_ptr + tl.where(mask, qq, 0) * W + tl.arange(0, W)[None, :]
    words = tl.load(ptr, mask=mask, other=0, volatile=True)
    acc = tl.sum((words & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), axis=0)
    stale = _stale(words, mask, flag)
    while stale != 0:
        words = tl.load(ptr, mask=mask, other=0, volatile=True)
        stale = _stale(words, mask, flag)
        acc = tl.sum((words & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), axis=0)
    return acc


@triton.jit
def _exchange_kernel(words_ptr, acc_ptr, bar_ptr, err_ptr, epoch_ptr, NP: tl.constexpr, BLOCK_Q: tl.constexpr,
                     W: tl.constexpr, ROUNDS: tl.constexpr, LL: tl.constexpr):  # fmt: skip
    q = tl.program_id(0)
    ww = tl.arange(0, W)
    epoch = tl.load(epoch_ptr)
    for r in range(ROUNDS):
        mine = (q + r).to(tl.float32) + ww.to(tl.float32) / W
        if LL:
            flag = _flag(epoch, r, ROUNDS)
            _put(words_ptr + (r * NP + q) * W + ww, _pack(mine, flag))
            total = _ll_sum(words_ptr + r * NP * W, flag, NP, BLOCK_Q, W)
        else:
            tl.atomic_add(acc_ptr + r * W + ww, mine, sem="relaxed")
            _arrive(bar_ptr + r)
            _wait(bar_ptr + r, NP)
            total = tl.load(acc_ptr + r * W + ww, cache_modifier=".cg")
        expected = (NP * (NP - 1) / 2 + NP * r) + NP * ww.to(tl.float32) / W
        tl.store(err_ptr + q * ROUNDS + r, tl.max(tl.abs(total - expected), axis=0))
    if q == 0:
        tl.store(epoch_ptr, epoch + 1)


def round_us(mode: str, programs: int, width: int, warps: int, rounds: int, calls: int) -> float:
    """GPU us a round, after checking every sum of a first launch."""
    block_q = triton.next_power_of_2(programs)
    words = torch.zeros(rounds, programs, width, dtype=torch.int64, device="cuda")
    epoch = torch.zeros(1, dtype=torch.int64, device="cuda")
    err = torch.zeros(programs, rounds, device="cuda")

    def launch() -> None:
        acc = torch.zeros(rounds, width, device="cuda")  # the barrier's accumulators and counters, zeroed a launch
        bar = torch.zeros(rounds, dtype=torch.int32, device="cuda")
        _exchange_kernel[(programs,)](words, acc, bar, err, epoch, NP=programs, BLOCK_Q=block_q, W=width,
                                      ROUNDS=rounds, LL=mode == "ll", num_warps=warps)  # fmt: skip

    launch()
    torch.cuda.synchronize()
    if err.max().item() > 1e-3:
        raise SystemExit(f"{mode}: wrong sums (max error {err.max().item()})")
    for _ in range(calls):  # untimed: the clocks up
        launch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        launch()
    end.record()
    end.synchronize()
    if err.max().item() > 1e-3:
        raise SystemExit(f"{mode}: wrong sums (max error {err.max().item()})")
    return start.elapsed_time(end) * 1000 / (calls * rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", type=int, nargs="+", default=[8, 16, 32], help="NP, one an SM")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 256], help="W values a program (powers of two)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=96, help="rounds a launch")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    print("| programs | values a program | warps | barrier + atomics, us a round | ll words, us a round |")
    print("|---:|---:|---:|---:|---:|")
    for programs in args.programs:
        for width in args.widths:
            warps = max(1, min(args.warps, triton.next_power_of_2(programs) * width // 128))
            times = [round_us(m, programs, width, warps, args.rounds, args.calls) for m in ("barrier", "ll")]
            print(f"| {programs} | {width} | {warps} | {times[0]:.2f} | {times[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
