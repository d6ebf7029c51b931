"""`fastdca inspect` (adapter attention maps, the DCA paper's Fig. 3) and `fastdca eval --xg-stats` on a tiny
random LLaMA, checked against direct computations from the op's own inputs."""

import importlib
import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from fastdca import DCAConfig, reference
from fastdca.commands.attention_maps import adapter_attention_maps
from fastdca.cli import main
from fastdca.commands.eval import xg_variance
from fastdca.patch import patch, record_adapter_attention, save_adapter

patch_mod = importlib.import_module("fastdca.patch")  # the module; `fastdca.patch` is the function
attention_mod = importlib.import_module("fastdca.hf.attention")  # where the attention function calls the op

CFG = DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2)  # the tiny model has 3 layers: 1 and 2 adapted
PROMPTS = ['Take the last letters of the words in "ANNA BELL" and concatenate them.',
           'Take the second letters of the words in "TOM KATE RIVERS" and concatenate them.']


def patched_tiny(path, seed=3):
    """The tiny model patched with CFG, its gates moved off zero (tanh(gate) of both signs, none near 0)."""
    model = LlamaForCausalLM.from_pretrained(path).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    torch.manual_seed(seed)
    patch(model, CFG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in patch_mod.adapter_state_dict(model).items():
            if name.endswith("gate"):
                p.copy_((0.5 + torch.rand(p.shape, generator=g)) * torch.tensor([1.0, -1.0]).repeat(p.numel() // 2))
    return model, tokenizer


class OpSpy:
    """Replaces the op patch.py calls: records each adapted layer's inputs and X_G per token from the op's own
    causal weights (xg="token"; X_G = w av[:H]), computed independently of `record_adapter_attention`."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.op = attention_mod.dca_attention
        monkeypatch.setattr(attention_mod, "dca_attention", self)

    def __call__(self, q, k, v, ak, av, gate, **kwargs):
        kwargs["xg"] = "token"
        out, weights = self.op(q, k, v, ak, av, gate, **kwargs)
        self.calls.append(dict(q=q, ak=ak, av=av, gate=gate, scale=kwargs["scale"], xg=reference.x_g(weights, av)))
        return out, None


def direct_adapter_probs(q, ak, gate, scale):
    """g * softmax(q ak^T * scale) in float64, query head h reading kv head h // (Hq / Hkv): (Hq, T, M)."""
    q = q[0].double()
    Hq, Hkv = q.shape[0], ak.shape[0]
    rows = []
    for h in range(Hq):
        scores = q[h] @ ak[h // (Hq // Hkv)].double().T * scale
        rows.append(math.tanh(gate.detach()[h].item()) * torch.softmax(scores, dim=-1))
    return torch.stack(rows)


def test_maps_equal_the_reference_probabilities_gate_included(tiny_model_dir, monkeypatch):
    model, tokenizer = patched_tiny(tiny_model_dir)
    spy = OpSpy(monkeypatch)
    maps = adapter_attention_maps(model, tokenizer, PROMPTS)
    assert maps["layer"] == 2 and maps["adapted_layers"] == [1, 2] and maps["head"] is None
    # the forward of each prompt calls layers 1 and 2: prompt 1 -> calls 0, 1; prompt 2 -> calls 2, 3
    for p, call in zip(range(2), (spy.calls[1], spy.calls[3])):
        tokens = maps["prompts"][p]["tokens"]
        probs = torch.tensor(maps["prompts"][p]["adapter_probs"], dtype=torch.float64)
        assert probs.shape == (4, len(tokens), CFG.adapter_len) == (4, call["q"].shape[2], CFG.adapter_len)
        # float32 against float64 from the same q: scores of size ~1 over D = 16 carry ~1e-7 relative error
        torch.testing.assert_close(probs, direct_adapter_probs(call["q"], call["ak"], call["gate"], call["scale"]),
                                   rtol=1e-5, atol=1e-6)
        # the gate is included: each head's row sums to g = tanh(gate), not to 1
        gates = torch.tanh(call["gate"].double())
        torch.testing.assert_close(probs.sum(-1), gates[:, None].expand(4, len(tokens)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(maps["gates"], dtype=torch.float64),
                               torch.tanh(spy.calls[1]["gate"].double()), rtol=1e-6, atol=1e-7)
    assert "".join(maps["prompts"][0]["tokens"]) == PROMPTS[0]


def test_recorded_xg_is_the_ops_xg_and_recording_stops_with_the_context(tiny_model_dir, monkeypatch):
    model, tokenizer = patched_tiny(tiny_model_dir)
    spy = OpSpy(monkeypatch)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), record_adapter_attention(model, layers=[1]) as records:
        model(**batch)
    assert list(records) == [1]
    torch.testing.assert_close(records[1].xg, spy.calls[0]["xg"], rtol=1e-5, atol=1e-7)
    assert torch.equal(records[1].real, batch["attention_mask"].bool())
    kept = records[1]
    with torch.no_grad():
        model(**tokenizer(PROMPTS[:1], return_tensors="pt"))
    assert records == {1: kept}, "a forward after the context records nothing"
    with pytest.raises(ValueError, match=r"layers must be adapted decoder layers \(1-2\); \[0\]"):
        with record_adapter_attention(model, layers=[0]):
            pass


def test_identical_prompts_have_no_xg_difference(tiny_model_dir):
    model, tokenizer = patched_tiny(tiny_model_dir)
    same = adapter_attention_maps(model, tokenizer, [PROMPTS[0], PROMPTS[0]])
    assert [row["layer"] for row in same["xg_difference"]] == [1, 2]
    for row in same["xg_difference"]:
        assert row["norms"][0] == row["norms"][1] > 0, "X_G is not 0, so a zero difference means something"
        assert row["difference"] == 0 and row["relative"] == 0
    different = adapter_attention_maps(model, tokenizer, PROMPTS)
    for row in different["xg_difference"]:
        assert row["relative"] > 1e-4
        assert row["relative"] == pytest.approx(row["difference"] / (sum(row["norms"]) / 2))
    assert adapter_attention_maps(model, tokenizer, PROMPTS[:1])["xg_difference"] == []


@pytest.mark.parametrize("kwargs,message", [
    (dict(layer=3), r"layer must be a decoder layer index in \[0, 3\), an adapted one \(1-2\); got 3"),
    (dict(layer=-1), r"layer must be a decoder layer index in \[0, 3\)"),
    (dict(layer=0), r"layer 0 has no DCA adapter; the adapted layers are 1-2"),
    (dict(head=4), r"head must be a query head index in \[0, 4\)"),
    (dict(prompts=PROMPTS + PROMPTS[:1]), r"prompts must be a list of one or two non-empty strings"),
    (dict(prompts=PROMPTS[0]), r"prompts must be a list of one or two"),
])
def test_bad_arguments_are_named(tiny_model_dir, kwargs, message):
    model, tokenizer = patched_tiny(tiny_model_dir)
    prompts = kwargs.pop("prompts", PROMPTS)
    with pytest.raises(ValueError, match=message):
        adapter_attention_maps(model, tokenizer, prompts, **kwargs)


def saved_adapter(tiny_model_dir, directory):
    model, _ = patched_tiny(tiny_model_dir)
    save_adapter(model, directory)
    return directory


def test_cli_inspect_writes_png_and_json(tiny_model_dir, tmp_path, capsys):
    adapter = saved_adapter(tiny_model_dir, tmp_path / "adapter")
    prefix = tmp_path / "maps" / "letters"
    assert main(["inspect", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", PROMPTS[0],
                 "--prompt", PROMPTS[1], "--layer", "1", "--head", "3", "--output", str(prefix)]) == 0
    printed = capsys.readouterr().out
    assert "|x1 - x2|" in printed
    maps = json.loads((tmp_path / "maps" / "letters.json").read_text())
    assert (maps["layer"], maps["head"], maps["causal_len"], len(maps["prompts"])) == (1, 3, 2, 2)
    for prompt in maps["prompts"]:
        probs = torch.tensor(prompt["adapter_probs"])
        assert probs.shape == (4, len(prompt["tokens"]), CFG.adapter_len)
        assert probs.abs().sum() > 0, "the saved adapter's gates are not 0"
    png = (tmp_path / "maps" / "letters.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in (tmp_path / "maps").iterdir() if p.name.startswith(".")], "no temporary file is left"


@pytest.mark.parametrize("extra,message", [
    (["--layer", "0"], "layer 0 has no DCA adapter"),
    (["--head", "9"], "head must be a query head index in [0, 4)"),
    (["--prompt", "a", "--prompt", "b"], "--prompt: give one or two prompts, got 3"),
])
def test_cli_inspect_errors(tiny_model_dir, tmp_path, capsys, extra, message):
    adapter = saved_adapter(tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", PROMPTS[0],
              "--output", str(tmp_path / "m"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_cli_inspect_without_adapter_is_freshly_patched(tiny_model_dir, tmp_path, capsys):
    assert main(["inspect", "--model", str(tiny_model_dir), "--prompt", "ANNA", "--template",
                 "--output", str(tmp_path / "fresh")]) == 0
    assert "zero gates" in capsys.readouterr().out
    maps = json.loads((tmp_path / "fresh.json").read_text())
    assert maps["adapted_layers"] == [0, 1, 2] and maps["layer"] == 2
    assert "ANNA" in "".join(maps["prompts"][0]["tokens"]) and len(maps["prompts"][0]["tokens"]) > 10
    assert torch.tensor(maps["prompts"][0]["adapter_probs"]).abs().max() == 0, "zero gates, zero probabilities"


# --------------------------------------------------------------------------------------------------
# eval --xg-stats


def direct_xg_variance(model, tokenizer, prompts, monkeypatch):
    """Per adapted layer, each prompt alone through the model, its X_G per token from the op itself;
    x_n = the mean over its tokens; mean over (h, d) of torch.var over n (unbiased); mean of x_n^2."""
    per_layer = {1: [], 2: []}
    spy = OpSpy(monkeypatch)
    for text in prompts:
        spy.calls.clear()
        with torch.no_grad():
            model(**tokenizer(text, return_tensors="pt"))
        for layer, call in zip((1, 2), spy.calls):
            per_layer[layer].append(call["xg"][0].double().mean(0))
    monkeypatch.setattr(attention_mod, "dca_attention", spy.op)
    return {layer: (torch.stack(x).var(0, unbiased=True).mean().item(), torch.stack(x).square().mean().item())
            for layer, x in per_layer.items()}


def test_xg_variance_equals_a_direct_computation(tiny_model_dir, monkeypatch):
    model, tokenizer = patched_tiny(tiny_model_dir)
    prompts = PROMPTS + ['Take the first letters of the words in "JO ED" and concatenate them.',
                         'Take the last letters of the words in "MARIA LOPEZ SMITH" and concatenate them.',
                         "ANNA"]
    expected = direct_xg_variance(model, tokenizer, prompts, monkeypatch)
    # batches of 2, 2 and 1 with padding: the per-batch moments must merge into the variance over all 5
    stats = xg_variance(model, tokenizer, prompts, batch_size=2, progress=False)
    assert stats["samples"] == 5 and [row["layer"] for row in stats["layers"]] == [1, 2]
    for row in stats["layers"]:
        variance, mean_square = expected[row["layer"]]
        assert variance > 0
        # padded batches against single-prompt runs: float32 rounding of the masked attention only
        assert row["variance"] == pytest.approx(variance, rel=1e-4)
        assert row["mean_square"] == pytest.approx(mean_square, rel=1e-4)
        assert row["relative_variance"] == pytest.approx(variance / mean_square, rel=1e-4)
        assert row["causal_layer"]
    single = xg_variance(model, tokenizer, prompts[:1], progress=False)
    assert single["layers"][0]["variance"] is None


def test_cli_eval_xg_stats(tiny_model_dir, tmp_path, capsys):
    adapter = saved_adapter(tiny_model_dir, tmp_path / "adapter")
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--task", "letter_concat",
                 "--limit", "3", "--batch-size", "3", "--max-new-tokens", "2", "--xg-stats"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    assert summary["xg_stats"] == str(adapter / "predictions.xg_stats.json")
    assert any(line.startswith("Var(X_G) across 3 samples") for line in printed)
    stats = json.loads((adapter / "predictions.xg_stats.json").read_text())
    assert stats["samples"] == 3 and stats["task"] == "letter_concat"
    assert [row["layer"] for row in stats["layers"]] == [1, 2]
    assert all(row["variance"] > 0 for row in stats["layers"])


def test_cli_eval_xg_stats_needs_an_adapter(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tiny_model_dir), "--task", "letter_concat", "--xg-stats"])
    assert exit_info.value.code == 2
    assert "--xg-stats needs --adapter" in capsys.readouterr().err


def test_cli_eval_task_options_pick_the_held_out_items(tiny_model_dir, tmp_path, capsys):
    """`--task-option` reaches the task in eval as in sweep: the adapter is scored on the held-out items of
    the split it was trained with (n_test=5 of second-last-letter names), not on the default split."""
    from fastdca.tasks import get_task

    output = tmp_path / "predictions.jsonl"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "letter_concat", "--task-option", "n_test=5",
                 "--task-option", "train_variants=second_last", "--batch-size", "5", "--max-new-tokens", "2",
                 "--output", str(output)]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    expected = get_task("letter_concat", n_test=5, train_variants=("second_last",)).examples("test")
    assert [row["id"] for row in rows] == [example.id for example in expected]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["total"] == 5


def test_cli_task_option_errors_name_the_option(tiny_model_dir, capsys):
    for option, message in (("n_test", "--task-option takes KEY=VALUE; got 'n_test'"),
                            ("n_tset=5", "does not take the options ['n_tset']")):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--model", str(tiny_model_dir), "--task", "letter_concat", "--task-option", option])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
