"""Time candidate launch configurations of each DCA kernel on this GPU: `python benchmarks/tune_kernels.py`.

For each kernel (forward, and the backward's adapter, dk/dv and dq kernels), head dim and, for the
forward, decoding, every candidate (BLOCK_M, BLOCK_N, warps, stages) is timed with the other kernels at
their table entries (`fastdca.kernels.tuning.launch_config`), bf16, B=4, Hq=Hkv=32 (T=2048) or
B=8, Hq=32, Hkv=8 (decoding, S=8192). The median of triton.testing.do_bench; the fastest candidate is
marked. This is how the tables in kernels/tuning.py were chosen (BENCHMARKS.md has the run). The
kernels behind switches (fwd_tma, bwd_dkdv_tma, bwd_dkdv_atomic, bwd_dkdv_atomic_tma) are timed with
their switches on; `--only bwd_dkdv_tma ...` sweeps just those.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

CANDIDATES = {
    128: dict(
        fwd=[(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
             (128, 32, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2)],
        bwd_adapter=[(64, 0, 4, 1), (64, 0, 4, 2), (128, 0, 8, 1), (128, 0, 4, 1), (32, 0, 2, 1)],
        bwd_dkdv=[(32, 128, 8, 2), (64, 128, 8, 1), (64, 128, 8, 2), (32, 64, 4, 1), (16, 64, 4, 2),
                  (32, 64, 4, 2), (64, 64, 4, 2), (128, 128, 8, 1)],
        bwd_dq=[(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2),
                (64, 32, 4, 3), (64, 64, 4, 3)],
        fwd_tma=[(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2)],
        bwd_dkdv_tma=[(32, 128, 8, 2), (32, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2)],
        bwd_dkdv_atomic=[(32, 32, 4, 2), (32, 64, 4, 1), (32, 128, 8, 2)],
        bwd_dkdv_atomic_tma=[(32, 32, 4, 2), (32, 64, 4, 3), (32, 128, 8, 2)],
    ),
    64: dict(
        fwd=[(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
        bwd_adapter=[(64, 0, 4, 1), (128, 0, 8, 1), (128, 0, 4, 1)],
        bwd_dkdv=[(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (128, 128, 8, 2)],
        bwd_dq=[(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
        fwd_tma=[(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3)],
        bwd_dkdv_tma=[(64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)],
        bwd_dkdv_atomic=[(32, 64, 4, 3), (32, 128, 8, 2), (32, 32, 4, 2)],
        bwd_dkdv_atomic_tma=[(32, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)],
    ),
}
DECODE = [(16, 64, 1, 2), (16, 128, 1, 2), (16, 64, 2, 2), (16, 128, 2, 3), (16, 64, 4, 3), (16, 256, 4, 2)]


def _inputs(B, Hq, Hkv, T, S, D, M=10, dtype=torch.bfloat16):
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype)
    return rnd(B, Hq, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D), rnd(Hkv, M, D), rnd(Hkv, M, D), rnd(Hq)


def _as_config(candidate):
    block_m, block_n, warps, stages = candidate
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


# the kernels behind switches: the switches (fastdca.commands.check.kernel_switches) their candidates are timed with
SWITCHED = {"fwd_tma": ("tma-fwd",), "bwd_dkdv_tma": ("tma-bwd",), "bwd_dkdv_atomic": ("atomic-dq",),
            "bwd_dkdv_atomic_tma": ("atomic-dq", "tma-bwd")}


def time_candidate(kernel, candidate, inputs, D):
    from fastdca.commands.check import kernel_switches

    with kernel_switches(SWITCHED.get(kernel, ())):
        return _time_candidate(kernel, candidate, inputs, D)


def _time_candidate(kernel, candidate, inputs, D):
    from triton.testing import do_bench

    from fastdca.kernels.backward import dca_backward
    from fastdca.kernels.forward import dca_forward

    q, k, v, ak, av, gate = inputs
    kw = dict(causal_len=2, scale=1 / math.sqrt(D), xg="sample", configs={kernel: _as_config(candidate)})
    if kernel.startswith("fwd"):
        return do_bench(lambda: dca_forward(q, k, v, ak, av, gate, **kw), warmup=20, rep=60, return_mode="median")
    out, lse, extra = dca_forward(q, k, v, ak, av, gate, **kw)
    dout, dcol = torch.randn_like(out), torch.randn_like(extra)
    return do_bench(lambda: dca_backward(dout, dcol, q, k, v, ak, av, gate, out, lse, **kw), warmup=20, rep=60,
                    return_mode="median")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every timing as JSON to PATH")
    parser.add_argument("--only", nargs="+", choices=("fwd", "bwd_adapter", "bwd_dkdv", "bwd_dq", "decode", *SWITCHED),
                        help="sweep only these kernels")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_kernels needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []
    for D, table in CANDIDATES.items():
        inputs = _inputs(4, 32, 32, 2048, 2048, D)
        for kernel, candidates in table.items():
            if not args.only or kernel in args.only:
                rows += _sweep(kernel, candidates, inputs, D, f"T=S=2048 D={D}")
    if not args.only or "decode" in args.only:
        rows += _sweep("fwd", DECODE, _inputs(8, 32, 8, 1, 8192, 128), 128, "decode S=8192 D=128")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def _sweep(kernel, candidates, inputs, D, label):
    rows = []
    for cand in candidates:
        try:
            ms = time_candidate(kernel, cand, inputs, D)
        except Exception as exc:  # a candidate that does not compile (shared memory) is reported, not fatal
            ms = float("nan")
            print(f"  {kernel} {cand}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        rows.append(dict(kernel=kernel, label=label, D=D, config=cand, ms=ms))
    best = min((r for r in rows if r["ms"] == r["ms"]), key=lambda r: r["ms"])
    for r in rows:
        mark = "  <- best" if r is best else ""
        print(f"{label:22s} {kernel:12s} {str(r['config']):18s} {r['ms'] * 1e3:9.1f} us{mark}", flush=True)
    return rows


if __name__ == "__main__":
    main()
