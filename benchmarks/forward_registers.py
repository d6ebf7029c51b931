"""Registers and spill bytes of the forward kernel for sm_90 per tile, with today's strided K/V loads and with
FASTDCA_TMA_FWD (tensor descriptors): compile-only, no GPU (the compile report's path, with the tile tables
patched per candidate). BENCHMARKS.md "Forward registers" holds its output for two Tritons:

    python benchmarks/forward_registers.py                           # the installed Triton
    PYTHONPATH=.triton-3.6 python benchmarks/forward_registers.py    # a second one (see .ci/run)
"""

import concurrent.futures
import multiprocessing
import os

TILES = [(64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)]
CASES = [("bfloat16", 128), ("float16", 64)]


def compile_one(job):
    from fastdca.kernels import dca_attention as k
    from fastdca.kernels import report

    dname, D, tile, tma = job
    if tma:
        k._TMA_FWD[max(64, D)] = tile
    else:
        k._LAUNCH[90]["fwd"][max(64, D)] = tile
    k._table_configs.cache_clear()
    row = report._rows_for(90, dname, D, 1024, False, kernels=("fwd",), extra={"tma_fwd": int(tma)})[0]
    return f"{row['regs']}" + (f", {row['spill']} B spilled" if row["spill"] else "")


def main():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    jobs = [(d, D, tile, tma) for d, D in CASES for tile in TILES for tma in (False, True)]
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
        cells = dict(zip(jobs, pool.map(compile_one, jobs)))
    print(f"Triton {triton.__version__}: registers of the sm_90 forward (xg=sample, padding mask)")
    print("| dtype, D | tile (M x N, warps, stages) | strided K/V | TMA |\n|---|---|---|---|")
    for d, D in CASES:
        for tile in TILES:
            print(f"| {d}, {D} | {tile[0]} x {tile[1]}, {tile[2]}, {tile[3]} | {cells[(d, D, tile, False)]} | "
                  f"{cells[(d, D, tile, True)]} |")


if __name__ == "__main__":
    main()
