"""Triton kernels of fastdca (installed as `fastdca.kernels`): kernels and their launch functions only.

Autograd lives in `fastdca.ops`; this package never imports torch.autograd or model code.

Notation (docs/DESIGN.md sections 1 and 2; per batch b and query head h, kv head kh = h // GROUP):
    s   = q k^T * scale      (T, S) prompt scores, bottom-right causal + key padding mask; or, for
                             sequences packed in one row (T = S), causal within each sequence:
                             query i sees key j iff start(i) <= j <= i, start(i) the first position
                             of i's sequence; with a sliding window W (HAS_WINDOW) also only
                             j > S - T + i - W, and key blocks wholly outside every row's window
                             are skipped; with a soft-cap c (HAS_SOFTCAP) s = c tanh(q k^T * scale / c)
    P   = softmax(s)         rows with no visible key are 0
    sa  = q ak^T * scale     (T, M) adapter scores, no mask
    Pa  = softmax(sa),  A = g * Pa,  g = tanh(gate[h]) or gate[h]
    out = P v + A av
    w   = A[:, :H]           the causal weights: the X_G statistics the op returns (per token, or summed
                             over each sample's real tokens); the loss forms X_G = w av[:H] from them

Neither s nor P is ever written to global memory, nor A but for w in token mode. Softmaxes run in base 2
(exp2 of s * log2(e)), so the saved row statistic `lse` is log2 of the prompt softmax denominator in those
units, +inf for a row with no visible key (then exp2(s - lse) is 0 without a special case in the backward).

Eight kernels, by module (each with its launcher):
    forward   _dca_key_span_kernel   each row's first and last real key, for the others' loop bounds
              _dca_fwd_kernel        out, lse, w (token mode) or its per-block column sums over the real rows
                                     (sample mode); dca_forward
    decode    _dca_decode_split_kernel, _dca_decode_combine_kernel
                                     the same for T <= 16 (decoding), flash-decoding style: the keys split
                                     over programs that each take a kv head's whole query group, then merged
    merge     _dca_merge_kernel      the forward's adapter half given its prompt half (FASTDCA_SDPA_FWD);
                                     dca_merge_forward
    backward  _dca_bwd_adapter_kernel  delta = rowsum(dout * P v), the whole adapter backward: dq's adapter
                                     term and per-block partial sums of dak, dav, dgate
              _dca_bwd_dkdv_kernel   dk, dv with one key block resident, looping over the query heads of
                                     its kv group and over query blocks
              _dca_bwd_dq_kernel     dq with one query block resident, added to the adapter term; dca_backward
Partial sums are reduced with torch sums of fixed shape: deterministic, no atomics (unless
FASTDCA_ATOMIC_DQ). Beside them: `blocks` (the @triton.jit building blocks the kernels share), `tuning` (the
launch configurations: the tile tables), `plumbing` (what the launchers share) and `report` (the compile
report: `python -m fastdca.kernels.report`).

bf16: the launchers set UPCAST under the interpreter (TRITON_INTERPRET=1), which widens every dot
operand to float32 after rounding it to bf16 (the interpreter mis-computes bf16 dots and arithmetic), so
the interpreter multiplies the same rounded P, A and dS a GPU does. Compiled for a GPU, bf16 tiles feed
tl.dot directly; all accumulation is float32 either way.

Run from the repository root, Python puts the root on sys.path and `import kernels` would find this folder
instead of Hugging Face's `kernels` package, which transformers imports. Imported under that top-level name,
this file hands the name over to the installed package (or to ModuleNotFoundError where none is installed),
so the repository never shadows it, whatever the working directory.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _installed_kernels_spec():
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        return importlib.machinery.PathFinder.find_spec("kernels", path)

    _spec = _installed_kernels_spec()
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module      # what the import statement returns: the installed package
    _spec.loader.exec_module(_module)
