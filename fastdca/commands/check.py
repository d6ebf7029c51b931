"""`fastdca check`: a self-test of the machine it runs on.

1. What was found: Python, torch, Triton, transformers and bitsandbytes versions, the device and its
   compute capability, and the backend `dca_attention` picks there for each dtype.
2. Numerics: `dca_attention` on the backend `auto` picks (with `interpret`, the Triton kernels under
   Triton's interpreter on the CPU) against `fastdca.reference` in float64, on MHA, GQA, padded and
   decoding shapes, in every dtype the device runs: the output, the X_G statistics and the six
   gradients, each by its normwise relative error ||x - ref|| / ||ref||. On the triton backend also the
   kernels behind switches until a GPU run checks them (SWITCHED_VARIANTS: FASTDCA_ATOMIC_DQ,
   FASTDCA_TMA_FWD, FASTDCA_TMA_BWD, FASTDCA_SDPA_FWD); a variant that raises is a failed check.
3. Speed (CUDA only): forward and backward of `dca_attention` against SDPA on the prompt-only problem
   (the same attention without the adapter: less work than DCA, so the floor), LLaMA-7B (32/32) and
   Llama-3-8B (32/8) heads, D = 128, T = 2048 and 8192, B = 4, bf16 (fp16 where bf16 is unsupported): time,
   TFLOP/s of the causal prompt attention and peak memory; fastdca with each switched kernel beside it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys

# Normwise relative error allowed per input dtype: fp32 accumulates like the reference up to
# summation order (~100 ulp of 2^-24); fp16 and bf16 round the output, P, dS and the gradients to
# their unit roundoff u (2^-11, 2^-8): 4u.
NORMWISE_TOLERANCE = {"float32": 1e-5, "float16": 4 * 2.0**-11, "bfloat16": 4 * 2.0**-8}

# the kernels behind switches, checked beside the default: each a tuple of switches kernel_switches turns on
SWITCHED_VARIANTS = (("atomic-dq",), ("tma-fwd",), ("tma-bwd",), ("atomic-dq", "tma-bwd"), ("sdpa-fwd",))

# (name, B, Hq, Hkv, T, S, D, M, H, padding)
SHAPES = (
    ("mha", 2, 4, 4, 48, 48, 64, 10, 2, None),
    ("gqa", 2, 8, 2, 70, 70, 128, 10, 2, None),
    ("padding", 3, 4, 2, 33, 33, 80, 10, 2, "left"),
    ("decode", 2, 8, 2, 1, 77, 128, 10, 2, "left"),
)


def versions() -> dict:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "bitsandbytes"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "unknown")
        except Exception as error:  # an installed but broken package is a finding too
            found[name] = f"not usable ({type(error).__name__})"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        found["device"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    else:
        found["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no CUDA"
    return found


def device_dtypes(device, interpret):
    import torch

    if device.type == "cuda":
        dtypes = [torch.float16, torch.float32]
        if torch.cuda.is_bf16_supported():
            dtypes.insert(1, torch.bfloat16)
        return dtypes
    return [torch.float32, torch.float16, torch.bfloat16] if interpret else [torch.float32]


def _relative_error(actual, expected):
    import torch

    expected = expected.to(torch.float64)
    diff = torch.linalg.vector_norm(actual.to(torch.float64) - expected)
    return float(diff / torch.linalg.vector_norm(expected).clamp(min=1e-300))


def check_numerics(device, backend, dtype, shape, seed=0):
    """Normwise relative errors of out, the causal weights' sums and the six gradients against the float64
    reference."""
    import torch

    from fastdca.ops import dca_attention

    name, B, Hq, Hkv, T, S, D, M, H, padding = shape
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(q=(B, Hq, T, D), k=(B, Hkv, S, D), v=(B, Hkv, S, D), ak=(Hkv, M, D), av=(Hkv, M, D), gate=(Hq,))
    inputs = {n: torch.randn(*s, generator=gen).to(dtype) for n, s in shapes.items()}
    mask = None
    if padding:
        lengths = torch.randint(1, S + 1, (B,), generator=gen)
        mask = torch.arange(S)[None, :] >= S - lengths[:, None]
    grad_out = torch.randn(B, T, Hq, D, generator=gen, dtype=torch.float64)
    grad_xg = torch.randn(B, Hq, H, generator=gen, dtype=torch.float64)

    def run(run_backend, run_dtype, run_device):
        leaves = {n: t.to(run_device, run_dtype, copy=True).requires_grad_(True) for n, t in inputs.items()}
        out, (sums, _) = dca_attention(**leaves, causal_len=H, backend=run_backend,
                                       key_padding_mask=None if mask is None else mask.to(run_device))
        loss = (out.double() * grad_out.to(run_device)).sum() + (sums.double() * grad_xg.to(run_device)).sum()
        loss.backward()
        results = {"out": out.detach(), "xg": sums.detach()}
        results.update({f"d{n}": leaf.grad for n, leaf in leaves.items()})
        return {n: t.cpu() for n, t in results.items()}

    actual = run(backend, dtype, device)
    expected = run("reference", torch.float64, torch.device("cpu"))
    return {n: _relative_error(actual[n], expected[n]) for n in expected}


def _backward_ms(fn, inputs):
    """(time of the backward of fn's output, the upstream gradient used); the output's graph is freed
    on return, so it does not count in a later peak-memory measurement."""
    import torch

    from fastdca.ops.timing import cuda_time_ms

    out = fn()
    grad = torch.randn_like(out)
    return cuda_time_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)), grad


def check_speed(B=4, seqs=(2048, 8192), D=128, M=10):
    """Forward and backward of dca_attention (auto backend, and each switched variant) and SDPA (prompt
    only), CUDA, at each T = S in `seqs`."""
    import torch
    import torch.nn.functional as F

    from fastdca.ops import dca_attention
    from fastdca.ops.timing import cuda_time_ms

    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    rows = []
    models = (("llama-7b 32/32", (32, 32)), ("llama-3-8b 32/8", (32, 8)))
    for T, (heads, (Hq, Hkv)) in ((T, model) for T in seqs for model in models):
        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

        q, k, v = rand(B, Hq, T, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D)
        ak, av, gate = rand(Hkv, M, D), rand(Hkv, M, D), rand(Hq)
        flops = 4 * B * Hq * D * T * (T + 1) / 2          # q k^T and P v over the causal half
        def dca():
            return dca_attention(q, k, v, ak, av, gate, causal_len=2)[0]

        impls = {   # name: (function, the kernels' switches it runs with)
            "fastdca": (dca, ()),
            "fastdca atomic dq": (dca, ("atomic-dq",)),
            "fastdca tma fwd": (dca, ("tma-fwd",)),
            "fastdca tma bwd": (dca, ("tma-bwd",)),
            "fastdca tma+atomic": (dca, ("tma-fwd", "tma-bwd", "atomic-dq")),
            "fastdca sdpa fwd": (dca, ("sdpa-fwd",)),
            "fastdca sdpa+tma+atomic": (dca, ("sdpa-fwd", "tma-bwd", "atomic-dq")),
            "sdpa (prompt only)": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                          enable_gqa=Hq != Hkv), ()),
        }
        for impl, (fn, switches) in impls.items():
            row = dict(heads=heads, impl=impl, dtype=str(dtype).replace("torch.", ""), B=B, T=T, D=D)
            try:
                with kernel_switches(switches):
                    with torch.no_grad():
                        fwd = cuda_time_ms(fn)
                    bwd, grad = _backward_ms(fn, (q, k, v))
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    torch.autograd.grad(fn(), (q, k, v), grad)
                    peak = torch.cuda.max_memory_allocated() - base
            except Exception as exc:    # reported in its row; the other implementations are still timed
                rows.append(dict(row, error=_one_line(exc)))
                continue
            rows.append(dict(row, fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=flops / fwd / 1e9,
                             bwd_tflops=2.5 * flops / bwd / 1e9, peak_mb=peak / 2**20))
    return rows


def _one_line(exc) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def kernel_switches(switches):
    """The kernels' switches on where named in `switches` ("atomic-dq": FASTDCA_ATOMIC_DQ, "tma-fwd":
    FASTDCA_TMA_FWD, "tma-bwd": FASTDCA_TMA_BWD, "sdpa-fwd": FASTDCA_SDPA_FWD) and off elsewhere while the
    block runs; None leaves them, and Triton unimported (the kernels are imported only where they run)."""
    if switches is None:
        yield
        return
    from fastdca.switches import ATOMIC_DQ, SDPA_FWD, TMA_BWD, TMA_FWD

    unknown = set(switches) - {"atomic-dq", "tma-fwd", "tma-bwd", "sdpa-fwd"}
    assert not unknown, unknown
    with ATOMIC_DQ.set("atomic-dq" in switches), TMA_FWD.set("tma-fwd" in switches), \
            TMA_BWD.set("tma-bwd" in switches), SDPA_FWD.set("sdpa-fwd" in switches):
        yield


def run_check(interpret=False, json_path=None, speed=True) -> int:
    """Print the report; 1 if any numerics check failed, else 0."""
    if interpret and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            # Triton reads the flag when it is imported, and the CLI's imports already did: run the check
            # again in a process that has the flag from its start
            import subprocess

            argv = [sys.executable, "-m", "fastdca.cli", "check", "--interpret", *([] if speed else ["--no-speed"]),
                    *(["--json", str(json_path)] if json_path else [])]
            return subprocess.run(argv, env=dict(os.environ, TRITON_INTERPRET="1")).returncode
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from fastdca.ops import resolve_backend

    found = versions()
    print("fastdca check")
    for key, value in found.items():
        print(f"  {key:13s} {value}")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtypes = device_dtypes(device, interpret)
    report = {"versions": found, "numerics": [], "speed": []}
    failures = 0
    print("\nnumerics against fastdca.reference in float64 (normwise relative error of out, X_G sums and the "
          "six gradients; worst of them)")
    print(f"  {'dtype':9s} {'backend':24s} {'shape':8s} {'worst':>9s} {'tensor':6s} {'allowed':>9s}  result")
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        probe = torch.empty(0, device=device, dtype=dtype)
        backend = "triton" if interpret else resolve_backend(None, probe)
        variants = [(backend, None)]
        if backend == "triton":
            variants = [(backend, ())] + [(f"triton+{'+'.join(on)}", on) for on in SWITCHED_VARIANTS]
        for label, switches in variants:
            for shape in SHAPES:
                try:
                    with kernel_switches(switches):
                        errors = check_numerics(device, backend, dtype, shape)
                except Exception as exc:    # a kernel that fails on this machine is a failed check, not a crash
                    failures += 1
                    message = _one_line(exc)
                    report["numerics"].append(dict(dtype=name, backend=label, shape=shape[0], error=message, ok=False))
                    print(f"  {name:9s} {label:24s} {shape[0]:8s} FAILED ({message[:120]})")
                    continue
                worst = max(errors, key=errors.get)
                ok = all(math.isfinite(e) for e in errors.values()) and errors[worst] <= NORMWISE_TOLERANCE[name]
                failures += not ok
                report["numerics"].append(dict(dtype=name, backend=label, shape=shape[0], errors=errors, ok=ok))
                print(f"  {name:9s} {label:24s} {shape[0]:8s} {errors[worst]:9.2e} {worst:6s} "
                      f"{NORMWISE_TOLERANCE[name]:9.2e}  {'ok' if ok else 'FAILED'}")
    if speed and device.type == "cuda":
        report["speed"] = check_speed()
        print("\nspeed: causal attention, B=4, D=128 (TFLOP/s of the prompt attention; backward 2.5x the "
              "forward's FLOPs)")
        print(f"  {'T':>5s} {'heads':16s} {'impl':23s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'bwd ms':>8s} {'TFLOP/s':>8s} "
              f"{'peak MiB':>9s}")
        for r in report["speed"]:
            if "error" in r:
                print(f"  {r['T']:5d} {r['heads']:16s} {r['impl']:23s} failed: {r['error'][:100]}")
                continue
            print(f"  {r['T']:5d} {r['heads']:16s} {r['impl']:23s} {r['fwd_ms']:8.3f} {r['fwd_tflops']:8.1f} "
                  f"{r['bwd_ms']:8.3f} {r['bwd_tflops']:8.1f} {r['peak_mb']:9.0f}")
    elif speed:
        print("\nspeed: skipped (no CUDA device)")
    print(f"\n{'all numerics checks passed' if not failures else f'{failures} numerics checks FAILED'}")
    if json_path:
        from fastdca.io import atomic_write_text

        atomic_write_text(json_path, json.dumps(report, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_check())
