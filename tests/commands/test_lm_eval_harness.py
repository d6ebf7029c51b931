"""Scoring an adapter with lm-evaluation-harness (fastdca/lm_eval_harness.py, `fastdca lm-eval`), offline, on a
local multiple-choice task of 8 items: the harness's CLI and its Python API score the adapter alike, and
not as the base model scores; a wrong adapter fails in one line naming it."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional `eval` extra")

import fastdca  # noqa: E402
from fastdca.hf import adapter_state_dict  # noqa: E402

TASK = "fastdca_tiny_mc"
NAMES = ["ann smith", "bob jones", "cat lee", "dan brown", "eve stone", "fay wood", "gus hill", "hal ford"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The base model, an adapter with gates of 1 (so that it changes the scores), the patched model's
    whole-model save_pretrained folder, and a local task folder for --include_path."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lm-eval")
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    fastdca.patch(model, fastdca.DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2))
    for name, param in adapter_state_dict(model).items():
        if name.endswith("gate"):
            param.data.fill_(1.0)
    fastdca.save_adapter(model, root / "adapter")
    model.save_pretrained(root / "saved", full_model=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "saved")

    data = root / "data.jsonl"
    with open(data, "w") as f:
        for name in NAMES:
            first, last = name.split()
            choices = [first[-1] + last[-1], last[-1] + first[-1], first[0] + last[0], first[-1] + last[0]]
            f.write(json.dumps({"question": f'Take the last letters of the words in "{name}" and concatenate them.',
                                "choices": choices, "label": 0}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {root / "datasets-cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return {"base": str(tiny_model_dir), "adapter": str(root / "adapter"), "saved": str(root / "saved"),
            "tasks": str(tasks), "root": root}


def run_cli(setup, model_args, output=None):
    command = [sys.executable, "-m", "fastdca.cli", "lm-eval", "--model", "fastdca", "--model_args", model_args,
               "--tasks", TASK, "--include_path", setup["tasks"], "--device", "cpu", "--batch_size", "8"]
    if output is not None:
        command += ["--output_path", str(output), "--log_samples"]
    return subprocess.run(command, capture_output=True, text=True, cwd=setup["root"], timeout=300,
                          env={**os.environ, **OFFLINE})


def run_api(setup, model, model_args):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import fastdca.lm_eval_harness  # noqa: F401  (registers the model "fastdca")

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], device="cpu", batch_size=8,
                                      task_manager=TaskManager(include_path=setup["tasks"], include_defaults=False),
                                      log_samples=True)
    return results["results"][TASK]["acc,none"], loglikelihoods(results["samples"][TASK])


def loglikelihoods(samples):
    """Per document (by doc_id), the log-likelihood of each choice."""
    return {s["doc_id"]: [float(ll) for ll, _ in s["filtered_resps"]] for s in samples}


def test_cli_and_api_score_the_adapter_not_the_base(setup, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    out = setup["root"] / "out"
    done = run_cli(setup, f"pretrained={setup['base']},adapter={setup['adapter']}", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fastdca (" in done.stdout and f"|{TASK}|" in done.stdout.replace(" ", ""), done.stdout
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    (samples_file,) = glob.glob(str(out / "*" / f"samples_{TASK}_*.jsonl"))
    with open(results_file) as f:
        cli_acc = json.load(f)["results"][TASK]["acc,none"]
    with open(samples_file) as f:
        cli_lls = loglikelihoods(json.loads(line) for line in f)
    assert sorted(cli_lls) == list(range(len(NAMES)))

    api_acc, api_lls = run_api(setup, "fastdca", {"pretrained": setup["base"], "adapter": setup["adapter"]})
    saved_acc, saved_lls = run_api(setup, "fastdca", {"pretrained": setup["saved"]})
    base_acc, base_lls = run_api(setup, "hf", {"pretrained": setup["base"]})

    def worst(a, b):
        return max(abs(x - y) for doc in a for x, y in zip(a[doc], b[doc], strict=True))

    # (a) the harness's CLI and its Python API score the adapter alike, from its folder or a save_pretrained one
    assert api_acc == cli_acc == saved_acc
    assert worst(cli_lls, api_lls) < 1e-4 and worst(cli_lls, saved_lls) < 1e-4
    # (b) and not as the base model scores: every choice's log-likelihood moved
    assert min(abs(x - y) for doc in cli_lls for x, y in zip(cli_lls[doc], base_lls[doc])) > 1e-2, (cli_lls, base_lls)
    print(f"acc: adapter {cli_acc}, base {base_acc}")


def test_a_wrong_adapter_fails_in_one_line_naming_it(setup, tmp_path):
    missing = tmp_path / "no-such-adapter"
    done = run_cli(setup, f"pretrained={setup['base']},adapter={missing}")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.rstrip("\n").splitlines()[-1] == f"fastdca lm-eval: error: adapter={missing}: no such folder"


def test_wrong_arguments_refused_in_one_line(setup, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdca.errors import AdapterError
    from fastdca.lm_eval_harness import FastDCALM

    def refused(match, **kwargs):
        with pytest.raises(AdapterError, match=re.escape(match)) as error:
            FastDCALM(device="cpu", **kwargs)
        assert "\n" not in str(error.value)

    base, adapter = setup["base"], setup["adapter"]
    refused(f"adapter={base} is not a fastdca adapter folder", pretrained=base, adapter=base)
    refused("needs adapter=ADAPTER_DIR", pretrained=base)
    refused("adapter= is empty", pretrained=base, adapter="")
    refused(f"pretrained={setup['saved']} is a fastdca-patched model's whole-model save_pretrained folder", pretrained=setup["saved"],
            adapter=adapter)
    # an adapter trained on another architecture: load_adapter's check, named as adapter=
    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    fastdca.patch(other, fastdca.DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2))
    fastdca.save_adapter(other, tmp_path / "other")
    refused(f"adapter={tmp_path / 'other'}: ", pretrained=base, adapter=str(tmp_path / "other"))


def test_fastdca_imports_no_lm_eval():
    code = ("import sys, fastdca, fastdca.cli; assert 'lm_eval' not in sys.modules, 'lm_eval imported'; "
            "assert 'lm-eval' in fastdca.cli.build_parser().format_help()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
