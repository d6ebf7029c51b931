"""`python -m fastdca.kernels.report`: every kernel compiles for sm_80 and sm_90 without spills,
without duplicated tensor-core or exp work and within shared memory, with the launch configurations
the launchers use. Compile-only, no GPU needed."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


# A second Triton, used only to compile (CI installs triton==3.6.0, what torch 2.11 pins, with
# `pip install --no-deps --target DIR` and names DIR here): the tables must hold on both.
SECOND_TRITON = os.environ.get("FASTDCA_SECOND_TRITON")


def _second_triton_version():
    import importlib.metadata

    dists = list(importlib.metadata.distributions(path=[SECOND_TRITON]))
    return next(d.version for d in dists if d.metadata["Name"] == "triton")


def _ptxas_present():
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return all(os.path.exists(get_ptxas(arch).path) for arch in (80, 90))
    except Exception:
        return False


@pytest.mark.skipif(not _ptxas_present(), reason="triton's bundled ptxas is missing")
@pytest.mark.parametrize("which", ["installed", "second"])
def test_report_compiles_all_kernels_without_spills(tmp_path, which):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compile, don't interpret
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    expected_version = triton.__version__
    if which == "second":
        if not SECOND_TRITON:
            pytest.skip("FASTDCA_SECOND_TRITON names no second Triton to compile with (.ci/run sets it)")
        env["PYTHONPATH"] = os.pathsep.join([SECOND_TRITON] + [p for p in [env.get("PYTHONPATH")] if p])
        expected_version = _second_triton_version()
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "-m", "fastdca.kernels.report", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith(f"Triton {expected_version} "), res.stdout[:200]
    rows = json.loads(out.read_text())
    seen = {(r["kernel"], r["target"], r["dtype"], r["D"]) for r in rows if r["shape"] == "train"}
    for kernel in ("fwd", "bwd_adapter", "bwd_dkdv", "bwd_dq"):
        for target in SHARED_LIMIT:
            for dtype in ("float16", "bfloat16"):
                for D in (64, 128):
                    assert (kernel, target, dtype, D) in seen
    from fastdca.kernels import report

    for r in rows:
        assert 0 < r["regs"] <= 255, r
        assert report.within_limits(r), r      # shared memory; no spills and no duplicated work where held
    trained = [r for r in rows if r["variant"] == "sample+mask" and r["shape"] == "train" and r["D"] <= 128
               and r["dtype"] != "float32" and r["kernel"] != "key_span"]
    assert len(trained) == 2 * 2 * 2 * 4
    for r in trained:
        assert r["spill"] == 0 and r["stack"] == 0, r
        assert report.ratio(r, "mma") <= report.MAX_MMA_RATIO, r
        assert report.ratio(r, "exp") <= report.MAX_EXP_RATIO, r
    # the work in one block-loop iteration: the forward's 2 matmuls and 1 exponential tile; the backward's
    # 7 and 2 per causal tile over its dk/dv and dq kernels, 5 and 1 with dq accumulated in the dk/dv kernel
    assert {(r["loop_dots"], r["loop_exps"]) for r in trained if r["kernel"] == "fwd"} == {(2, 1)}
    assert {(r["loop_dots"], r["loop_exps"]) for r in trained if r["kernel"] == "bwd_adapter"} == {(0, 0)}
    assert report.backward_tile_work(rows) == {"deterministic": (7, 2), "atomic dq": (5, 1),
                                               "deterministic tma": (7, 2), "atomic dq tma": (5, 1)}
    assert "backward work per causal tile" in res.stdout
    # the forward with q, K, V and out through tensor descriptors (FASTDCA_TMA_FWD), on sm_90: TMA loads in its loop,
    # a tile of at least 64 x 128 in at most 232 registers without spills, its work as the default's
    tma = [r for r in rows if "+tma_fwd1" in r["variant"] and r["shape"] == "train"]
    assert {(r["target"], r["D"]) for r in tma} == {("sm_90", 128), ("sm_90", 64)}
    for r in tma:
        block_m, block_n = map(int, r["blocks"].split("x")[:2])
        assert r["tma_loads"] >= 2 and r["regs"] <= 232 and r["spill"] == 0 and block_m * block_n >= 64 * 128, r
        assert (r["loop_dots"], r["loop_exps"]) == (2, 1), r
    # the backward with FASTDCA_TMA_BWD (the dk/dv kernel's q and dout, the dq kernel's K and V through tensor
    # descriptors), on sm_90: TMA loads in the loops, pipelined (at least 2 stages), without spills, with and
    # without atomic dq
    tma_bwd = [r for r in rows if "+tma_bwd1" in r["variant"] and r["shape"] == "train"]
    assert {(r["kernel"], r["target"], r["D"], "atomic_dq1" in r["variant"]) for r in tma_bwd} == {
        (kernel, "sm_90", D, atomic) for D in (64, 128) for kernel, atomic in
        (("bwd_dkdv", False), ("bwd_dkdv", True), ("bwd_dq", False))}
    for r in tma_bwd:
        assert r["tma_loads"] >= 2 and r["num_stages"] >= 2 and r["spill"] == 0, r
    assert not any(r["tma_loads"] for r in rows if not {"tma_fwd1", "tma_bwd1"} & set(r["variant"].split("+")))
    assert {r["variant"] for r in rows} >= {"sample+mask", "token+mask", "none"}
    assert "floor us" in res.stdout and "H100" in res.stdout
