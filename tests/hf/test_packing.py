"""Packed sequences (cu_seqlens): the op on every backend against the reference in float64, the
reference against each sequence run alone, the patch against padded batches, and `fastdca train --packing`."""

import os

import pytest
import torch
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

import fastdca
from backend_check import DEVICE, check_against_reference, make_inputs
from fastdca import reference
from fastdca.ops import dca_attention, packed_causal_attention

# (B, Hq, Hkv, T, S, D, M, H, sequence lengths): B = 1 and T = S = their sum
PACKED = [
    pytest.param((1, 4, 2, 12, 12, 64, 10, 2, (3, 1, 8)), id="gqa-length-1"),
    pytest.param((1, 2, 1, 24, 24, 40, 7, 3, (1,) * 8 + (3, 5, 2, 1, 4, 1)), id="many-short-in-one-block"),
    pytest.param((1, 4, 4, 150, 150, 64, 10, 2, (7, 130, 13)), id="one-spanning-several-blocks"),
    pytest.param((1, 3, 1, 70, 70, 80, 4, 4, (1, 40, 2, 27)), id="gqa3-d80-H=M"),
]
triton_runs = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                 reason="the triton backend needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("xg", ["sample", "token", None])
@pytest.mark.parametrize("shape", PACKED)
def test_torch_backend_packed_matches_reference(shape, xg, dtype):
    check_against_reference("torch", shape, xg, dtype)


@triton_runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("xg", ["sample", "token", None])
@pytest.mark.parametrize("shape", PACKED)
def test_triton_packed_matches_reference(shape, xg, dtype):
    check_against_reference("triton", shape, xg, dtype)


@triton_runs
@pytest.mark.parametrize("xg", ["sample", "token"])
@pytest.mark.parametrize("shape", [PACKED[0], PACKED[2]])
def test_triton_packed_bf16_matches_reference(shape, xg):
    check_against_reference("triton", shape, xg, torch.bfloat16)


def test_reference_packed_equals_each_sequence_alone():
    """The definition: packing N sequences in a row computes what N separate calls compute, and each
    sequence is one sample of the X_G statistics."""
    lengths = (5, 1, 9, 3)
    inputs, cu = make_inputs(1, 4, 2, sum(lengths), sum(lengths), 16, 6, lengths, torch.float64)
    out, (sums, counts) = reference.dca_attention(**inputs, causal_len=3, cu_seqlens=cu)
    _, x_g = reference.dca_attention(**inputs, causal_len=3, cu_seqlens=cu, xg="token")
    start = 0
    for n, length in enumerate(lengths):
        piece = {name: t[:, :, start:start + length] if name in "qkv" else t for name, t in inputs.items()}
        alone, (alone_sums, alone_counts) = reference.dca_attention(**piece, causal_len=3)
        _, alone_xg = reference.dca_attention(**piece, causal_len=3, xg="token")
        torch.testing.assert_close(out[:, start:start + length], alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_g[:, start:start + length], alone_xg, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sums[n], alone_sums[0], rtol=1e-12, atol=1e-12)
        assert counts[n] == alone_counts[0] == length
        start += length


def test_packed_causal_attention_matches_reference():
    lengths = (4, 1, 11)
    inputs, cu = make_inputs(1, 6, 2, 16, 16, 32, 1, lengths, torch.float64)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    probs = reference.prompt_probs(q, k.repeat_interleave(3, 1), 0.25, cu_seqlens=cu)
    expected = probs @ v.repeat_interleave(3, 1)
    torch.testing.assert_close(packed_causal_attention(q, k, v, cu, 0.25), expected, rtol=1e-12, atol=1e-12)


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cu_seqlens=torch.tensor([0, 3, 7])), r"cu_seqlens must be an int32 tensor of shape \(N \+ 1,\)"),
    (dict(cu_seqlens=_cu(0, 3, 7)[None]), r"cu_seqlens must be an int32 tensor"),
    (dict(cu_seqlens=_cu(7)), r"at least one sequence"),
    (dict(cu_seqlens=_cu(0, 3, 7), key_padding_mask=torch.ones(1, 7, dtype=torch.bool, device=DEVICE)),
     r"key_padding_mask and cu_seqlens are alternatives"),
    (dict(cu_seqlens=_cu(0, 3, 6)), r"end at S=7"),
    (dict(cu_seqlens=_cu(1, 3, 7)), r"start at 0"),
    (dict(cu_seqlens=_cu(0, 3, 3, 7)), r"increase strictly"),
])
def test_bad_cu_seqlens(kwargs, match):
    inputs, _ = make_inputs(1, 2, 1, 7, 7, 16, 4, None, torch.float32)
    with pytest.raises(ValueError, match=match):
        dca_attention(**inputs, causal_len=1, **kwargs)


def test_cu_seqlens_needs_one_row_without_cache():
    inputs, _ = make_inputs(2, 2, 1, 7, 7, 16, 4, None, torch.float32)
    with pytest.raises(ValueError, match=r"one row of queries and keys \(B = 1, T = S\), got B=2"):
        dca_attention(**inputs, causal_len=1, cu_seqlens=_cu(0, 3, 7))
    inputs, _ = make_inputs(1, 2, 1, 5, 7, 16, 4, None, torch.float32)
    with pytest.raises(ValueError, match=r"got B=1, T=5, S=7"):
        dca_attention(**inputs, causal_len=1, cu_seqlens=_cu(0, 3, 7))


# --------------------------------------------------------------------------------------------------
# the patch: the same examples padded and packed


def _tiny_patched(impl, variance, xg_space, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    model = LlamaForCausalLM(config)
    # two adapted layers of three: the unadapted first layer must attend within sequences too
    fastdca.patch(model, fastdca.DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2, causal_layers=2,
                                           variance=variance, xg_space=xg_space), backend="torch")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()          # non-zero gates: the adapter term and X_G count
    return model


def _examples(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return rows


def _padded(rows):
    from fastdca.train import PadCollator

    return PadCollator(pad_token_id=0)(rows)


def _loss_and_grads(model, batch):
    out = model(**batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    return out, grads


@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
@pytest.mark.parametrize("variance, xg_space", [("sample", "head"), ("token", "hidden")])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padded_and_packed_batches_give_the_same_loss_and_gradients(impl, variance, xg_space, flash_kwargs):
    """DataCollatorWithFlattening's packed row (read from cu_seq_lens_q, or from restarting position_ids
    alone) against the right-padded batch of the same examples: logits, CE, L_causal and adapter gradients."""
    lengths = (9, 3, 14, 1, 6)
    rows = _examples(lengths)
    model = _tiny_patched(impl, variance, xg_space)
    padded, padded_grads = _loss_and_grads(model, _padded(rows))
    packed_batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(rows)
    packed, packed_grads = _loss_and_grads(model, packed_batch)

    real_logits = torch.cat([padded.logits[i, :n] for i, n in enumerate(lengths)])
    # fp32 rounding: logits of size ~1 through three layers; losses and gradients summed in another order
    torch.testing.assert_close(packed.logits[0], real_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.ce_loss, padded.ce_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(packed.causal_loss, padded.causal_loss, rtol=1e-4, atol=0)
    assert packed.causal_loss > 0
    for got, expected in zip(packed_grads, padded_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_unpacked_model_attends_across_sequences_and_patched_does_not():
    """Why the patch must handle packing: the base sdpa model given the packed row attends across
    example boundaries; the patched model (gates 0, so equal to the base model) does not."""
    rows = _examples((5, 8))
    batch = DataCollatorWithFlattening()(rows)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    alone = torch.cat([model(torch.tensor([r["input_ids"]])).logits[0] for r in rows])
    base_packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert (base_packed[5:] - alone[5:]).abs().max() > 1e-3
    fastdca.patch(model, fastdca.DCAConfig(adapter_layers=1, adapter_len=4))
    patched_packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    torch.testing.assert_close(patched_packed, alone, rtol=1e-5, atol=1e-5)


def test_left_padded_generation_is_not_read_as_packing():
    """Left-padded rows give their pads position 1, which looks like restarting positions: generation
    must still be the padded computation."""
    model = _tiny_patched("sdpa", "sample", "head")
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    alone = model.generate(input_ids=ids[:1, 2:], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[0, 2:], alone[0])


def test_cu_seq_lens_that_disagree_are_refused():
    model = _tiny_patched("sdpa", "sample", "head")
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(_examples((4, 6)))
    batch["cu_seq_lens_k"] = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="same boundaries for queries and keys"):
        model(**batch)


# --------------------------------------------------------------------------------------------------
# fastdca train --packing


def _train(tiny_model_dir, output, packing, variance):
    from transformers import PreTrainedTokenizerFast

    from fastdca.tasks import LetterConcatenation
    from fastdca.train import TrainSettings, train

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    config = fastdca.DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2, variance=variance)
    torch.manual_seed(0)
    fastdca.patch(model, config, backend="torch")
    settings = TrainSettings(max_steps=4, batch_size=3, grad_accum=2, learning_rate=5e-2, logging_steps=1,
                             save_steps=4, packing=packing)
    examples = LetterConcatenation(n_train=48, train_variants=("second_last",)).examples("train")
    history = train(model, tokenizer, examples, output, config=config, settings=settings, progress=False)
    return history, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variance", ["sample", "token"])
def test_train_packing_follows_the_padded_run(tiny_model_dir, tmp_path, variance):
    """Same examples, same steps, with gradient accumulation: packed training logs the same CE and
    causal loss and ends with the same adapter as padded training, to float32 rounding."""
    padded, padded_params = _train(tiny_model_dir, tmp_path / "padded", False, variance)
    packed, packed_params = _train(tiny_model_dir, tmp_path / "packed", True, variance)
    assert [h["step"] for h in packed] == [1, 2, 3, 4]
    for a, b in zip(padded, packed):
        assert b["ce"] == pytest.approx(a["ce"], rel=1e-4)
        assert b["causal_loss"] == pytest.approx(a["causal_loss"], rel=1e-3, abs=1e-9)
    for name, value in padded_params.items():
        torch.testing.assert_close(packed_params[name], value, rtol=1e-3, atol=1e-5)
    assert (tmp_path / "packed" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_on_quantised_models(bits, tmp_path):
    """bitsandbytes 4-bit (nf4) and 8-bit base weights: packed and padded batches agree."""
    pytest.importorskip("bitsandbytes")
    import transformers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)   # nf4 blocks of 64 on the CPU
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    qc = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32) if bits == 4
          else transformers.BitsAndBytesConfig(load_in_8bit=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qc, device_map="cpu")
    fastdca.patch(model, fastdca.DCAConfig(adapter_layers=1, adapter_len=4, causal_len=2, causal_layers=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    rows = _examples((7, 2, 11))
    padded, padded_grads = _loss_and_grads(model, _padded(rows))
    packed, packed_grads = _loss_and_grads(model, DataCollatorWithFlattening()(rows))
    torch.testing.assert_close(packed.ce_loss, padded.ce_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(packed.causal_loss, padded.causal_loss, rtol=1e-4, atol=0)
    for got, expected in zip(packed_grads, padded_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
