"""Compile report and roofline of the DCA kernels, with no GPU: `python -m fastdca.kernels.report`.

1. Compile-only check (docs/DESIGN.md section 5.2). The launchers of `fastdca.kernels` are run on CPU
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
def _recording(modules, log):
    saved = {(m, n): getattr(m, n) for m in modules for n in dir(m) if n.startswith("_dca_") and n.endswith("_kernel")}
    try:
        for (m, n), fn in saved.items():
            setattr(m, n, _Recorder(fn, log))
        yield
    finally:
        for (m, n), fn in saved.items():
            setattr(m, n, fn)


@contextlib.contextmanager
def _targeting(module, arch):
    """The launchers choose their tables for `arch` although the recorded tensors are on the CPU."""
    saved = module.target_arch
    module.target_arch = lambda device: arch
    try:
        yield
    finally:
        module.target_arch = saved


def record_launches(dtype, D, T, S, *, arch, B=1, Hq=2, Hkv=2, M=10, H=2, xg="sample", padded=True, window=None,
                    softcap=None, atomic_dq=False, tma_fwd=False, tma_bwd=False, sdpa_fwd=False):
    """(kernel, grid, args, kwargs) of every launch the forward and backward launchers make on a GPU of
    compute capability `arch`; `padded`: True (a key padding mask), False (none) or "packed" (two
    sequences packed in the row, cu_seqlens); `window`: a sliding window, or None; `softcap`: a cap on
    the prompt scores, or None; `atomic_dq`: the backward with FASTDCA_ATOMIC_DQ=1 (dq accumulated in the
    dk/dv kernel); `tma_fwd`: the forward with FASTDCA_TMA_FWD=1 (q, K, V and out through tensor descriptors);
    `tma_bwd`: the backward with FASTDCA_TMA_BWD=1 (the backward's loops through tensor descriptors);
    `sdpa_fwd`: the forward with FASTDCA_SDPA_FWD=1 (the prompt half given, the merge kernel adding the rest)."""
    import torch

    from fastdca.kernels import backward, decode, forward, merge, tuning
    from fastdca.switches import ATOMIC_DQ, TMA_BWD, TMA_FWD, triton_interpreted

    assert not triton_interpreted(), "the report compiles for GPUs: unset TRITON_INTERPRET"
    q = torch.empty(B, Hq, T, D, dtype=dtype)
    kv = torch.empty(B, Hkv, S, D, dtype=dtype)
    ak = torch.empty(Hkv, M, D, dtype=dtype)
    gate = torch.zeros(Hq, dtype=dtype)
    mask = torch.ones(B, S, dtype=torch.bool) if padded is True else None
    cu_seqlens = torch.tensor([0, S // 2, S], dtype=torch.int32) if padded == "packed" else None
    kw = dict(causal_len=H, scale=D ** -0.5, key_padding_mask=mask, cu_seqlens=cu_seqlens, window=window,
              softcap=softcap, gate_fn="tanh", xg=xg)
    log = []
    with _recording((forward, decode, merge, backward), log), _targeting(tuning, arch), \
            ATOMIC_DQ.set(bool(atomic_dq)), TMA_FWD.set(bool(tma_fwd)), TMA_BWD.set(bool(tma_bwd)):
        if sdpa_fwd:
            prompt = (torch.empty_like(q), torch.empty(B, Hq, T, dtype=torch.float32))
            out, lse, extra = merge.dca_merge_forward(q, *prompt, ak, ak, gate, causal_len=H, scale=D ** -0.5,
                                                      key_padding_mask=mask, gate_fn="tanh", xg=xg)
        else:
            out, lse, extra = forward.dca_forward(q, kv, kv, ak, ak, gate, **kw)
        dxg = None if extra is None else torch.zeros_like(extra)
        backward.dca_backward(torch.zeros_like(out), dxg, q, kv, kv, ak, ak, gate, out, lse, **kw)
    return log


# --------------------------------------------------------------------------------------------------
# compiling


_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int8": "i8", "int32": "i32", "bool": "i1"}


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


_DOT_TYPES = re.compile(r"tt\.dot .*: tensor<(\d+)x(\d+)x\w+> \* tensor<(\d+)x(\d+)x\w+>")
_EXP2_TYPE = re.compile(r"math\.exp2 .*: tensor<([\dx]+)x\w+>")
_MMA = re.compile(r"\b(wgmma\.mma_async|mma)\.sync\.aligned\.m(\d+)n(\d+)k(\d+)\b")
_EX2_FTZ = re.compile(r"\bex2\.approx\.ftz\.f32\b")
_TMA_LOAD = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.shared")       # a TMA load into shared memory


def work_counts(ttir, ptx, num_warps):
    """Tensor-core FLOPs and softmax exponentials: what the dots and exp2s of the kernel need (from the
    TTIR: 2*M*N*K per tt.dot, one per element of each math.exp2 of a tensor) and what the compiled code
    issues (from the PTX: 2*m*n*k per mma instruction times the warps that run it, or per wgmma times
    the warpgroups; 32 lanes per ex2.approx.ftz instruction, which is what tl.exp2 lowers to, times
    the warps). Both are static counts, one per instruction in the code, so loops count once on both
    sides and the ratio is per iteration. The adapter's M counts as padded to 16, as tl.dot requires.
    The gate's scalar sigmoid (one non-ftz ex2 per thread and program) is not softmax work and is
    left out of both."""
    needed_flops = sum(2 * int(m) * int(k) * int(n) for m, k, _, n in _DOT_TYPES.findall(ttir))
    needed_exp = 0
    for dims in _EXP2_TYPE.findall(ttir):
        count = 1
        for d in dims.split("x"):
            count *= int(d)
        needed_exp += count
    issued_flops = 0
    for op, m, n, k in _MMA.findall(ptx):
        issuers = num_warps // 4 if op.startswith("wgmma") else num_warps
        issued_flops += 2 * int(m) * int(n) * int(k) * issuers
    issued_exp = len(_EX2_FTZ.findall(ptx)) * 32 * num_warps
    return dict(mma_needed=needed_flops, mma_issued=issued_flops, exp_needed=needed_exp, exp_issued=issued_exp)


def loop_work(ttir):
    """(matmuls, exponentials) in one iteration of the kernel's block loop: the tt.dot ops and the tile-shaped
    math.exp2 ops (2-D: the softmax's probabilities, not the 1-D rescaling of the row statistics) in an
    scf.for body. The kernels split their loop into copies of one body (blocks that need no mask, then the
    ones that do); the largest body counts. (0, 0) for a kernel without a loop (the adapter backward)."""
    best, body, indent = (0, 0), None, None
    for line in ttir.splitlines():
        if body is None:
            if " scf.for " in line and line.rstrip().endswith("{"):
                body, indent = [0, 0], len(line) - len(line.lstrip())
            continue
        stripped = line.lstrip()
        if stripped.startswith("}") and len(line) - len(stripped) == indent:
            best, body = max(best, tuple(body)), None
        elif " tt.dot " in line:
            body[0] += 1
        elif " math.exp2 " in line and re.search(r": tensor<\d+x\d+x\w+>", line):
            body[1] += 1
    return best


def compile_launch(fn, args, kwargs, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialise(fn, args, kwargs)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    regs, spill, stack = _ptxas_usage(compiled.asm["ptx"], arch)
    loop_dots, loop_exps = loop_work(compiled.asm["ttir"])
    return dict(regs=regs, spill=spill, stack=stack, shared=compiled.metadata.shared, loop_dots=loop_dots,
                loop_exps=loop_exps, tma_loads=len(_TMA_LOAD.findall(compiled.asm["ptx"])),
                num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                **work_counts(compiled.asm["ttir"], compiled.asm["ptx"], compiled.metadata.num_warps))


def _rows_for(arch, dname, D, T, decode, xg="sample", padded=True, kernels=None, extra=None):
    import torch

    rows = []
    shapes = [("train", T, T)] + ([("decode", 1, T)] if decode else [])
    extra = extra or {}
    variant = (f"{xg or 'none'}{'+packed' if padded == 'packed' else '+mask' if padded else ''}"
               + "".join(f"+{name}{value:g}" for name, value in extra.items()))
    for label, t, s in shapes:
        for fn, grid, args, kwargs in record_launches(getattr(torch, dname), D, t, s, arch=arch, xg=xg, padded=padded,
                                                      **extra):
            name = fn.__name__.replace("_dca_", "").replace("_kernel", "")
            if (label == "decode" and not name.startswith("decode")) or (kernels and name not in kernels):
                continue     # decoding runs the flash-decoding forward only
            usage = compile_launch(fn, args, kwargs, arch)
            blocks = "x".join(str(kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_A") if b in kwargs)
            rows.append(dict(kernel=name, shape=label, variant=variant, target=f"sm_{arch}", dtype=dname, D=D,
                             blocks=blocks, **usage))
    return rows


# (dtype, D) pairs of the main table: the fp16/bf16 x D=64/128, plus D=256 (the largest supported)
DEFAULT_CASES = (("float16", 64), ("float16", 128), ("bfloat16", 64), ("bfloat16", 128), ("float16", 256))
# the other constexpr variants the launchers can select: (dtype, D, xg, padded, kernels or None = all,
# {"window": sliding window, "softcap": score cap} or None; such a variant is compiled for decoding too).
# float32 is the exact-dot correctness path; it is listed, and not held to the no-spill rule.
VARIANT_CASES = (("float16", 128, "token", True, ("fwd", "bwd_adapter"), None),
                 ("float16", 128, None, False, ("fwd", "bwd_adapter", "bwd_dkdv", "bwd_dq"), None),
                 ("float16", 128, None, "packed", ("fwd", "bwd_dkdv", "bwd_dq"), None),
                 ("float16", 128, "token", "packed", ("fwd",), None),
                 ("bfloat16", 128, "sample", True, ("fwd", "decode_split", "bwd_dkdv", "bwd_dq"), {"window": 256}),
                 ("float16", 64, "token", "packed", ("fwd", "bwd_dkdv", "bwd_dq"), {"window": 256}),
                 ("bfloat16", 128, "sample", True, ("fwd", "decode_split", "bwd_dkdv", "bwd_dq"),
                  {"window": 256, "softcap": 50.0}),
                 ("bfloat16", 128, "sample", True, ("bwd_dkdv",), {"atomic_dq": 1}),
                 ("float16", 64, "sample", True, ("bwd_dkdv",), {"atomic_dq": 1}),
                 ("bfloat16", 128, "sample", True, ("fwd",), {"tma_fwd": 1}),
                 ("float16", 128, None, False, ("fwd",), {"tma_fwd": 1}),
                 ("float16", 64, "token", "packed", ("fwd",), {"tma_fwd": 1, "window": 256}),
                 ("bfloat16", 128, "sample", True, ("bwd_dkdv", "bwd_dq"), {"tma_bwd": 1}),
                 ("float16", 64, "sample", True, ("bwd_dkdv", "bwd_dq"), {"tma_bwd": 1}),
                 ("bfloat16", 128, "sample", True, ("bwd_dkdv",), {"atomic_dq": 1, "tma_bwd": 1}),
                 ("float16", 64, "sample", True, ("bwd_dkdv",), {"atomic_dq": 1, "tma_bwd": 1}),
                 ("float16", 128, None, "packed", ("bwd_dkdv",), {"atomic_dq": 1, "tma_bwd": 1, "window": 256}),
                 ("bfloat16", 128, "sample", True, ("merge",), {"sdpa_fwd": 1}),
                 ("float16", 64, "token", True, ("merge",), {"sdpa_fwd": 1}),
                 ("float16", 128, None, False, ("merge",), {"sdpa_fwd": 1}),
                 ("float32", 64, "sample", True, None, None), ("float32", 128, "sample", True, None, None))


def compile_table(archs=(80, 90), cases=DEFAULT_CASES, variants=VARIANT_CASES, T=1024, decode=True,
                  workers=None):
    """One row per (kernel, target, dtype, D, variant, launch shape) the launchers use: T = S = 1024
    ("train": the forward and the three backward kernels) and, with `decode`, the forward at T = 1,
    S = 1024; the main cases with xg="sample" and a padding mask, then `variants`."""
    import concurrent.futures
    import multiprocessing

    jobs = [(arch, dname, D, T, decode, "sample", True, None, None) for arch in archs for dname, D in cases]
    jobs += [(arch, dname, D, T, extra is not None, xg, padded, kernels, extra)
             for arch in archs for dname, D, xg, padded, kernels, extra in variants
             if arch >= 90 or not {"tma_fwd", "tma_bwd"} & set(extra or {})]     # TMA: Hopper and newer
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_rows_for, *zip(*jobs)))
    return [row for rows in results for row in rows]


# Issued over needed work allowed for fp16/bf16. Tensor-core FLOPs: no warp may compute another's
# tile. Exponentials: the row statistics of the online softmax (one per row, per key block) are held by
# every lane that holds part of the row, 4 in the mma and wgmma layouts, which costs 4/BLOCK_N extra.
MAX_MMA_RATIO = 1.05
MAX_EXP_RATIO = 1.10


def ratio(row, kind):
    """Issued over needed tensor-core FLOPs ("mma") or exponentials ("exp"); None where none are needed
    or none are issued on tensor cores (the float32 path's exact dots run on the FMA units)."""
    needed, issued = row[f"{kind}_needed"], row[f"{kind}_issued"]
    return issued / needed if needed and issued else None


def held_to_limits(row) -> bool:
    """fp16/bf16 kernels must not spill, in every X_G mode; float32 (exact fp32 dots) is the correctness path,
    listed only."""
    return row["dtype"] != "float32"


def held_to_ratios(row) -> bool:
    """fp16/bf16 at D <= 128 in training must not duplicate work. D = 256 and decoding trade duplicated
    score work for registers and loads in flight (BENCHMARKS.md, "The tile tables", says why)."""
    return row["dtype"] != "float32" and row["D"] <= 128 and row["shape"] == "train"


def within_limits(row) -> bool:
    if row["shared"] > SHARED_LIMIT[int(row["target"][3:])]:
        return False
    if held_to_limits(row) and (row["spill"] or row["stack"]):
        return False
    if held_to_ratios(row):
        mma, exp = ratio(row, "mma"), ratio(row, "exp")
        no_dots = row["mma_needed"] == 0     # the key-span kernel: a reduction, no matmul
        return (no_dots or (mma is not None and mma <= MAX_MMA_RATIO)) and (exp is None or exp <= MAX_EXP_RATIO)
    return True


def _fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}"


def format_table(rows):
    head = ("kernel", "shape", "variant", "target", "dtype", "D", "blocks(M,N,D,A)", "warps", "stages", "regs",
            "spill B", "shared B", "mma x", "exp x", "loop dot/exp", "ok")
    lines = [head]
    for r in rows:
        ok = "yes" if within_limits(r) else "NO"
        if ok == "yes" and r["spill"]:
            ok = "spills (fp32)"
        lines.append((r["kernel"], r["shape"], r["variant"], r["target"], r["dtype"], str(r["D"]), r["blocks"],
                      str(r["num_warps"]), str(r["num_stages"]), str(r["regs"]), str(r["spill"]),
                      str(r["shared"]), _fmt_ratio(ratio(r, "mma")), _fmt_ratio(ratio(r, "exp")),
                      f"{r['loop_dots']}/{r['loop_exps']}", ok))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def backward_tile_work(rows, target="sm_90", dtype="bfloat16", D=128):
    """{"deterministic" | "atomic dq" | ... + " tma": (matmuls, exponentials)} per causal tile of the
    training backward, summed over the kernels that visit the tile (dk/dv and dq; with atomic dq the dk/dv
    kernel alone, as the launchers then launch no dq kernel), with the dk/dv loop's strided loads and with
    FASTDCA_TMA_BWD's tensor descriptors: FlashAttention-2/3 take 5 and 1."""
    def loops(variant, kernels):
        picked = [r for r in rows if r["target"] == target and r["dtype"] == dtype and r["D"] == D
                  and r["shape"] == "train" and r["variant"] == variant and r["kernel"] in kernels]
        assert len(picked) == len(kernels), (variant, kernels)
        return sum(r["loop_dots"] for r in picked), sum(r["loop_exps"] for r in picked)

    return {"deterministic": loops("sample+mask", ("bwd_dkdv", "bwd_dq")),
            "atomic dq": loops("sample+mask+atomic_dq1", ("bwd_dkdv",)),
            "deterministic tma": loops("sample+mask+tma_bwd1", ("bwd_dkdv", "bwd_dq")),
            "atomic dq tma": loops("sample+mask+atomic_dq1+tma_bwd1", ("bwd_dkdv",))}


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
    from fastdca.switches import triton_interpreted

    if triton_interpreted():
        sys.exit("unset TRITON_INTERPRET: the report compiles for real GPU targets")
    import triton

    print(f"Triton {triton.__version__} ({os.path.dirname(triton.__file__)})")
    if not args.no_compile:
        start = time.time()
        rows = compile_table()
        print(format_table(rows))
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        work = backward_tile_work(rows)
        print("\nbackward work per causal tile (sm_90, bf16, D=128; matmuls/exponentials over the kernels that "
              "visit it): " + ", ".join(f"{k} {d}/{e}" for k, (d, e) in work.items()) + " (FlashAttention-2/3: 5/1)")
        bad = [r for r in rows if not within_limits(r)]
        print(f"\n{len(rows)} compilations in {time.time() - start:.0f} s; "
              f"{'fp16/bf16 without spills or duplicated work, all within shared memory' if not bad else f'{len(bad)} OVER LIMITS'}\n")
    print(format_roofline(roofline()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
