"""Registers and spill bytes for sm_90 per tile of the kernels whose loops can read through tensor descriptors,
with today's strided loads and with TMA: the forward (FASTDCA_TMA_FWD: K and V), the dk/dv kernel
(FASTDCA_TMA_BWD: q and dout; without and with FASTDCA_ATOMIC_DQ) and the dq kernel (FASTDCA_TMA_BWD: K and
V). Compile-only, no GPU (the compile report's
path, with the tile tables patched per candidate). BENCHMARKS.md "Registers per tile" holds its output for
two Tritons:

    python benchmarks/tile_registers.py                           # the installed Triton
    PYTHONPATH=.triton-3.6 python benchmarks/tile_registers.py    # a second one (see .ci/run)
"""

import concurrent.futures
import multiprocessing
import os

CASES = [("bfloat16", 128), ("float16", 64)]
# kernel: (tiles (BLOCK_M, BLOCK_N, warps, stages), {column: (the report's switches, the table entry set)})
KERNELS = {
    "fwd": ([(64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)],
            {"strided K/V": ({}, "fwd"), "TMA": ({"tma_fwd": 1}, "fwd_tma")}),
    "bwd_dkdv": ([(32, 64, 4, 1), (32, 64, 4, 2), (32, 64, 4, 3), (32, 32, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2)],
                 {"strided q/dout": ({}, "bwd_dkdv"), "TMA": ({"tma_bwd": 1}, "bwd_dkdv_tma"),
                  "atomic dq, strided": ({"atomic_dq": 1}, "bwd_dkdv_atomic"),
                  "atomic dq, TMA": ({"atomic_dq": 1, "tma_bwd": 1}, "bwd_dkdv_atomic_tma")}),
    "bwd_dq": ([(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
               {"strided K/V": ({}, "bwd_dq"), "TMA": ({"tma_bwd": 1}, "bwd_dq")}),
}


def _set_entry(k, entry, D, tile):
    if entry in k._TMA_DKDV:
        k._TMA_DKDV[entry][D] = tile
    elif entry == "fwd_tma":
        k._TMA_FWD[D] = tile
    elif entry == "bwd_dkdv_atomic":
        k._ATOMIC_DKDV[90][D] = tile
    else:
        k._LAUNCH[90][entry][D] = tile


def compile_one(job):
    from fastdca.kernels import tuning as k
    from fastdca.kernels import report

    kernel, column, dname, D, tile = job
    switches, entry = KERNELS[kernel][1][column]
    _set_entry(k, entry, max(64, D), tile)
    k._table_configs.cache_clear()
    row = report._rows_for(90, dname, D, 1024, False, kernels=(kernel,), extra=switches)[0]
    return f"{row['regs']}" + (f", {row['spill']} B spilled" if row["spill"] else "")


def main():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    jobs = [(kernel, column, d, D, tile) for kernel, (tiles, columns) in KERNELS.items() for column in columns
            for d, D in CASES for tile in tiles]
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
        cells = dict(zip(jobs, pool.map(compile_one, jobs)))
    for kernel, (tiles, columns) in KERNELS.items():
        print(f"\nTriton {triton.__version__}: registers of the sm_90 {kernel} kernel (xg=sample, padding mask)\n")
        print("| dtype, D | tile (M x N, warps, stages) | " + " | ".join(columns) + " |")
        print("|---|---|" + "---|" * len(columns))
        for d, D in CASES:
            for tile in tiles:
                print(f"| {d}, {D} | {tile[0]} x {tile[1]}, {tile[2]}, {tile[3]} | "
                      + " | ".join(cells[(kernel, column, d, D, tile)] for column in columns) + " |")


if __name__ == "__main__":
    main()
