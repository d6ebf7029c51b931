"""Compile report and roofline of the DCA kernels, with no GPU: `python -m fastdca.kernels.report`.

1. Compile-only check (DESIGN.md section 5.2). The launchers in `dca_attention` are run on CPU
   tensors with every kernel replaced by a recorder, so the report compiles exactly the arguments,
   constexprs, block sizes, warps and stages the launchers pass; the arguments are specialised the way
   Triton's JIT does (integers equal to 1 become constants, pointers and integers divisible by 16 get
   the divisibility hint). Each kernel is compiled with `triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 80|90, 32))`; registers and spill bytes come from running the bundled
   ptxas with `-v` on the PTX (the flags Triton's own cubin step uses), shared memory from the metadata.
2. A roofline floor for LLaMA-7B attention shapes on an H100 SXM.

Must run without TRITON_INTERPRET (the interpreter does not compile); the test runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
H100_FLOPS = 989e12   # dense fp16/bf16 tensor-core FLOP/s, H100 SXM
H100_BW = 3.35e12     # HBM3 bytes/s, H100 SXM


# --------------------------------------------------------------------------------------------------
# recording the launches


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.fn, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(module, log):
    names = [n for n in dir(module) if n.startswith("_dca_") and n.endswith("_kernel")]
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, fn in saved.items():
            setattr(module, n, _Recorder(fn, log))
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def record_launches(dtype, D, T, S, *, B=1, Hq=2, Hkv=2, M=10, H=2, xg="sample", padded=True):
    """(kernel, grid, args, kwargs) of every launch the forward and backward launchers make."""
    import torch

    from fastdca.kernels import dca_attention as k

    assert os.environ.get("TRITON_INTERPRET") != "1", "the report compiles for GPUs: unset TRITON_INTERPRET"
    q = torch.empty(B, Hq, T, D, dtype=dtype)
    kv = torch.empty(B, Hkv, S, D, dtype=dtype)
    ak = torch.empty(Hkv, M, D, dtype=dtype)
    gate = torch.zeros(Hq, dtype=dtype)
    mask = torch.ones(B, S, dtype=torch.bool) if padded else None
    kw = dict(causal_len=H, scale=D ** -0.5, key_padding_mask=mask, gate_fn="tanh", xg=xg)
    log = []
    with _recording(k, log):
        out, lse, extra = k.dca_forward(q, kv, kv, ak, ak, gate, **kw)
        dxg = torch.zeros(B, Hq, H) if xg == "sample" else (torch.zeros_like(out) if xg == "token" else None)
        k.dca_backward(torch.zeros_like(out), dxg, q, kv, kv, ak, ak, gate, out, lse, **kw)
    return log


# --------------------------------------------------------------------------------------------------
# compiling


_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int8": "i8", "bool": "i1"}


def _specialise(fn, args, kwargs):
    """signature, constexprs and attrs for ASTSource, as Triton's JIT specialises a launch."""
    import torch

    names = fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    for i, name in enumerate(names):
        value = values[name]
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
            attrs[(i,)] = [["tt.divisibility", 16]]     # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot specialise {type(value).__name__}")
    return signature, constexprs, attrs


def _ptxas_usage(ptx, arch):
    """(registers, spill bytes stores+loads, stack bytes) from the bundled ptxas -v on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    return regs, spill, stack


def compile_launch(fn, args, kwargs, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialise(fn, args, kwargs)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    regs, spill, stack = _ptxas_usage(compiled.asm["ptx"], arch)
    return dict(regs=regs, spill=spill, stack=stack, shared=compiled.metadata.shared,
                num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages)


def _rows_for(arch, dname, D, T, decode, xg="sample", padded=True, kernels=None):
    import torch

    rows = []
    shapes = [("train", T, T)] + ([("decode", 1, T)] if decode else [])
    variant = f"{xg or 'none'}{'+mask' if padded else ''}"
    for label, t, s in shapes:
        for fn, grid, args, kwargs in record_launches(getattr(torch, dname), D, t, s, xg=xg, padded=padded):
            name = fn.__name__.replace("_dca_", "").replace("_kernel", "")
            if (label == "decode" and name != "fwd") or (kernels and name not in kernels):
                continue     # decoding runs the forward only
            usage = compile_launch(fn, args, kwargs, arch)
            blocks = "x".join(str(kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_A") if b in kwargs)
            rows.append(dict(kernel=name, shape=label, variant=variant, target=f"sm_{arch}", dtype=dname, D=D,
                             blocks=blocks, **usage))
    return rows


# (dtype, D) pairs of the main table: the fp16/bf16 x D=64/128, plus D=256 (the largest supported)
DEFAULT_CASES = (("float16", 64), ("float16", 128), ("bfloat16", 64), ("bfloat16", 128), ("float16", 256))
# the other constexpr variants the launchers can select: (dtype, D, xg, padded, kernels or None = all).
# float32 is the exact-dot correctness path; it is listed, and not held to the no-spill rule.
VARIANT_CASES = (("float16", 128, "token", True, ("fwd", "bwd_adapter")),
                 ("float16", 128, None, False, ("fwd", "bwd_adapter", "bwd_dkdv", "bwd_dq")),
                 ("float32", 64, "sample", True, None), ("float32", 128, "sample", True, None))


def compile_table(archs=(80, 90), cases=DEFAULT_CASES, variants=VARIANT_CASES, T=1024, decode=True,
                  workers=None):
    """One row per (kernel, target, dtype, D, variant, launch shape) the launchers use: T = S = 1024
    ("train": the forward and the three backward kernels) and, with `decode`, the forward at T = 1,
    S = 1024; the main cases with xg="sample" and a padding mask, then `variants`."""
    import concurrent.futures
    import multiprocessing

    jobs = [(arch, dname, D, T, decode, "sample", True, None) for arch in archs for dname, D in cases]
    jobs += [(arch, dname, D, T, False, xg, padded, kernels)
             for arch in archs for dname, D, xg, padded, kernels in variants]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_rows_for, *zip(*jobs)))
    return [row for rows in results for row in rows]


def held_to_limits(row) -> bool:
    """fp16/bf16 kernels must not spill; all must fit the target's shared memory."""
    return row["dtype"] != "float32"


def within_limits(row) -> bool:
    shared_ok = row["shared"] <= SHARED_LIMIT[int(row["target"][3:])]
    return shared_ok and (row["spill"] == 0 or not held_to_limits(row))


def format_table(rows):
    head = ("kernel", "shape", "variant", "target", "dtype", "D", "blocks(M,N,D,A)", "warps", "stages", "regs",
            "spill B", "shared B", "ok")
    lines = [head]
    for r in rows:
        ok = "yes" if within_limits(r) else "NO"
        if ok == "yes" and r["spill"]:
            ok = "spills (fp32)"
        lines.append((r["kernel"], r["shape"], r["variant"], r["target"], r["dtype"], str(r["D"]), r["blocks"],
                      str(r["num_warps"]), str(r["num_stages"]), str(r["regs"]), str(r["spill"]),
                      str(r["shared"]), ok))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


# --------------------------------------------------------------------------------------------------
# roofline


def roofline(B=4, H=32, D=128, seqs=(256, 1024, 4096), M=10, bytes_per=2):
    """FLOPs, fewest bytes and time floor per pass for causal T = S self-attention plus the adapter.

    Prompt FLOPs count the causal half of the score matrix (what a diagonal-skipping kernel does;
    ~T^2/2 pairs): forward 2 matmuls (q k^T, P v) = 4 * B H D T^2/2; backward 5 matmuls (recompute
    q k^T, dP = dout v^T, dv += P^T dout, dq += dS k, dk += dS^T q) = 10 * B H D T^2/2. The adapter
    adds 2 (forward) and 5 (backward) matmuls of T x M x D per head. Fewest bytes: forward reads q, k,
    v and writes out and lse; backward reads q, k, v, out, dout, lse and writes dq, dk, dv (the
    adapter tensors are negligible). The floor is max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s).
    """
    rows = []
    for T in seqs:
        pairs = T * (T + 1) / 2
        tok = B * H * T * D * bytes_per
        fwd_flops = 4 * B * H * D * pairs + 4 * B * H * T * M * D
        bwd_flops = 10 * B * H * D * pairs + 10 * B * H * T * M * D
        fwd_bytes = 4 * tok + 4 * B * H * T
        bwd_bytes = 8 * tok + 4 * B * H * T
        for name, flops, nbytes in (("fwd", fwd_flops, fwd_bytes), ("bwd", bwd_flops, bwd_bytes)):
            t_c, t_m = flops / H100_FLOPS, nbytes / H100_BW
            rows.append(dict(pass_=name, T=T, flops=flops, bytes=nbytes, t_compute=t_c, t_memory=t_m,
                             floor=max(t_c, t_m), bound="compute" if t_c >= t_m else "memory",
                             intensity=flops / nbytes))
    return rows


def format_roofline(rows):
    lines = ["LLaMA-7B attention (B=4, Hq=Hkv=32, D=128, M=10, causal T=S, fp16), H100 SXM floor:",
             f"{'pass':4s}  {'T=S':>5s}  {'GFLOP':>9s}  {'min MB':>8s}  {'FLOP/B':>7s}  {'compute us':>10s}  "
             f"{'memory us':>9s}  {'floor us':>9s}  bound"]
    for r in rows:
        lines.append(f"{r['pass_']:4s}  {r['T']:5d}  {r['flops'] / 1e9:9.2f}  {r['bytes'] / 1e6:8.2f}  "
                     f"{r['intensity']:7.0f}  {r['t_compute'] * 1e6:10.1f}  {r['t_memory'] * 1e6:9.1f}  "
                     f"{r['floor'] * 1e6:9.1f}  {r['bound']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="print only the roofline")
    parser.add_argument("--json", metavar="PATH", help="also write the compile table's rows as JSON to PATH")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton's current default, stated
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the report compiles for real GPU targets")
    if not args.no_compile:
        start = time.time()
        rows = compile_table()
        print(format_table(rows))
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        bad = [r for r in rows if not within_limits(r)]
        print(f"\n{len(rows)} compilations in {time.time() - start:.0f} s; "
              f"{'fp16/bf16 without spills, all within shared memory' if not bad else f'{len(bad)} OVER LIMITS'}\n")
    print(format_roofline(roofline()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
