"""Out of memory (docs/troubleshooting.md): one line that says what ran out, at which batch and length, what to change
and what a resume starts from; --auto-batch-size halves the micro-batch and doubles the accumulation until a step fits.
A real out of memory (an address-space limit) in a subprocess; the accelerator's error type simulated in-process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from fastdca.cli import main
from fastdca.out_of_memory import OutOfMemory, next_micro_batch

GPU_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.00 MiB "
           "is free. Of the allocated memory 77.50 GiB is allocated by PyTorch")


def train_argv(model, out, *extra):
    return ["train", "--model", str(model), "--task", "letter_concat", "--output", str(out), "--adapter-layers", "2",
            "--adapter-len", "4", "--limit", "16", "--batch-size", "8", "--max-steps", "3", "--save-steps", "1",
            "--logging-steps", "1", "--seed", "1", *extra]


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture
def gpu_fits(monkeypatch):
    """The model's forward raises torch's OutOfMemoryError (a GPU's) for a training micro-batch of more rows than
    fits["rows"], after fits["after_calls"] such forwards have run (fits["calls"] counts them)."""
    fits = {"rows": 4, "after_calls": 0, "calls": 0}
    forward = LlamaForCausalLM.forward

    def limited(self, *args, **kwargs):
        rows = kwargs["input_ids"].shape[0] if "input_ids" in kwargs else args[0].shape[0]
        if self.training and rows > fits["rows"] and torch.is_grad_enabled():
            fits["calls"] += 1
            if fits["calls"] > fits["after_calls"]:
                raise torch.OutOfMemoryError(GPU_OOM)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", limited)
    return fits


def test_gpu_out_of_memory_is_one_line_and_a_smaller_micro_batch_resumes_the_checkpoints(tiny_model_dir, tmp_path,
                                                                                        gpu_fits, capsys):
    """Steps 1 and 2 fit, step 3 runs out: one line after the progress bar's, exit 2, checkpoint-2 kept; the same
    command with --batch-size 4 --grad-accum 2 resumes it. The library raises OutOfMemory with the same text."""
    out = tmp_path / "run"
    gpu_fits["after_calls"] = 2          # a micro-batch of 8 fits twice (steps 1 and 2), not a third time
    assert exit_code(train_argv(tiny_model_dir, out)) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("fastdca train: error: out of GPU 0's memory (79.19 GiB) in training step 3, a micro-batch "
                           "of 8 examples padded to "), last
    for part in ("(batch size 8, accumulation 1, max length 256): it tried to allocate 2.00 GiB",
                 "--batch-size 4 --grad-accum 2 (the same 8 examples a step)", "--gradient-checkpointing",
                 "--max-length", "--load-in-4bit", "--auto-batch-size",
                 "the same command with --batch-size 4 --grad-accum 2, --gradient-checkpointing or --auto-batch-size "
                 "resumes from checkpoint-2"):
        assert part in last, part
    assert "Traceback" not in err and "\r" not in last
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / ".checkpoint-partial").exists()

    gpu_fits.update(calls=0, after_calls=0)
    assert main(train_argv(tiny_model_dir, out, "--batch-size", "4", "--grad-accum", "2")) == 0
    printed = capsys.readouterr().out
    assert ("resuming with another micro-batch: settings.batch_size x grad_accum: 8 x 1 -> 4 x 2 (the same 8 examples "
            "a step)") in printed
    record = json.loads((out / "run.json").read_text())
    assert record["finished"] and record["settings"]["batch_size"] == 4 and record["settings"]["grad_accum"] == 2
    assert any("8 x 1 -> 4 x 2" in change for change in record["resumed_anyway"])
    assert [h["step"] for h in json.loads((out / "loss_history.json").read_text())] == [1, 2, 3]

    # a smaller micro-batch alone would change the examples a step: refused, naming the --grad-accum that resumes
    (out / "run.json").write_text(json.dumps(dict(record, finished=False)))
    assert exit_code(train_argv(tiny_model_dir, out, "--batch-size", "2", "--grad-accum", "1")) == 2
    assert "(--batch-size 2 --grad-accum 4 keeps its 8 examples a step, and resumes)" in capsys.readouterr().err

    # the library's error: fastdca's type, the same text, raised from torch's
    from fastdca.train import TrainSettings, train
    from fastdca.patch import patch
    from fastdca import DCAConfig
    from fastdca.tasks import LetterConcatenation
    from transformers import PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    config = DCAConfig(adapter_layers=2, adapter_len=4)
    patch(model, config)
    gpu_fits.update(calls=0, after_calls=0)
    with pytest.raises(OutOfMemory) as raised:
        train(model, PreTrainedTokenizerFast.from_pretrained(tiny_model_dir),
              LetterConcatenation(n_train=16, n_test=2).examples("train"), tmp_path / "lib", config=config,
              settings=TrainSettings(max_steps=1, batch_size=8), progress=False)
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
    assert str(raised.value).startswith("out of GPU 0's memory (79.19 GiB) in training step 1, a micro-batch of 8")


def test_auto_batch_size_keeps_the_examples_a_step_and_equals_the_run_at_the_batch_it_settled_on(
        tiny_model_dir, tmp_path, gpu_fits, capsys):
    """Micro-batches of 8 do not fit: --auto-batch-size trains 4 x 2 accumulated, prints it once, records it in
    run.json, and its adapter is the one `--batch-size 4 --grad-accum 2` trains (the failed try leaves nothing)."""
    auto = tmp_path / "auto"
    assert main(train_argv(tiny_model_dir, auto, "--auto-batch-size")) == 0
    printed = capsys.readouterr().out
    assert printed.count("--auto-batch-size: a step fits at micro-batch 4, 2 accumulated (8 examples a step)") == 1
    record = json.loads((auto / "run.json").read_text())
    assert record["auto_batch_size"] == {"batch_size": 4, "grad_accum": 2} and record["finished"]
    assert record["settings"]["batch_size"] == 8 and record["settings"]["grad_accum"] == 1    # as asked
    assert main(train_argv(tiny_model_dir, tmp_path / "plain", "--batch-size", "4", "--grad-accum", "2")) == 0
    a, b = load_file(auto / "adapter.safetensors"), load_file(tmp_path / "plain" / "adapter.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in b)

    # a resume of the same command starts at the recorded micro-batch: no micro-batch of 8 is tried again
    (auto / "run.json").write_text(json.dumps(dict(record, finished=False)))
    gpu_fits["calls"] = 0
    assert main(train_argv(tiny_model_dir, auto, "--auto-batch-size", "--resume-anyway", "--max-steps", "4")) == 0
    assert gpu_fits["calls"] == 0
    assert json.loads((auto / "run.json").read_text())["auto_batch_size"] == {"batch_size": 4, "grad_accum": 2}



def test_the_search_halves_to_divisors_of_the_step_and_stops_at_the_floor():
    """With the causal loss on, no micro-batch below 2 (the variance over one sample is 0): the search re-raises the
    last out-of-memory error, and the message says why it stopped."""
    from fastdca.train.memory import search_micro_batch

    tried = []

    def run(batch_size, grad_accum):
        tried.append((batch_size, grad_accum))
        raise torch.OutOfMemoryError(GPU_OOM)

    with pytest.raises(torch.OutOfMemoryError):
        search_micro_batch(run, 96, 96, 2)
    assert tried == [(96, 1), (48, 2), (24, 4), (12, 8), (6, 16), (3, 32)]
    assert [next_micro_batch(s, 24, 1) for s in (6, 3, 1)] == [3, 1, None]
    error = OutOfMemory("GPU memory", "in training step 1", batch_size=3, grad_accum=32, min_batch=2)
    assert str(error) == ("out of GPU memory in training step 1. To fit, try --gradient-checkpointing, a shorter "
                          "--max-length or --load-in-4bit (no micro-batch below 2: the variance over one sample is 0, "
                          "no causal loss)")


def test_eval_out_of_memory_and_auto_batch_size(tiny_model_dir, tmp_path, monkeypatch, capsys):
    generate = LlamaForCausalLM.generate

    def limited(self, *args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError(GPU_OOM)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", limited)
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "letter_concat", "--limit", "5", "--batch-size", "4",
            "--max-new-tokens", "3", "--output", str(tmp_path / "p.jsonl")]
    assert exit_code(argv) == 2
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert last.startswith("fastdca eval: error: out of GPU 0's memory (79.19 GiB) generating for a batch of 4 prompts "
                           "of up to "), last
    assert "(batch size 4, up to 3 new tokens)" in last and "To fit, try --batch-size 2, --auto-batch-size" in last
    assert main(argv + ["--auto-batch-size"]) == 0
    assert "--auto-batch-size: batches of 2 fit" in capsys.readouterr().out
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 5


def test_out_of_memory_elsewhere_and_in_demo_and_sweep_names_their_options(monkeypatch, capsys):
    import fastdca.cli as cli
    from fastdca.commands import demo as demo_module

    def load(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1113587712 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(cli, "load", load)
    assert exit_code(["eval", "--model", "m", "--task", "letter_concat"]) == 2
    assert capsys.readouterr().err == ("fastdca eval: error: out of CPU memory (RAM) in fastdca eval: it tried to "
                                       "allocate 1.11 GB. To fit, try --load-in-4bit or a smaller --batch-size\n")

    def demo(**kwargs):
        raise OutOfMemory("CPU memory (RAM)", "in training step 1, a micro-batch of 8 examples", batch_size=8,
                          min_batch=2, checkpoint="/x/adapter/checkpoint-4") from MemoryError()

    monkeypatch.setattr(demo_module, "_demo", demo)
    assert exit_code(["demo", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdca demo: error: out of CPU memory (RAM) in training step 1")
    assert "--grad-accum" not in err and "To fit, try --auto-batch-size" in err
    assert "the same command with --auto-batch-size resumes from checkpoint-4" in err


REAL_DRIVER = textwrap.dedent("""
    import resource, sys
    import torch
    from transformers import TrainerCallback
    import fastdca.train
    from fastdca.cli import main

    torch.set_num_threads(1)          # no thread stacks or allocator arenas made under the limit
    margin, argv = int(sys.argv[1]), sys.argv[2:]


    class LimitMemory(TrainerCallback):
        # the address space the process holds when training begins, plus `margin` MB (once: a retry keeps it)
        set = False

        def on_train_begin(self, args, state, control, **kwargs):
            if not LimitMemory.set:
                LimitMemory.set = True
                with open("/proc/self/status") as f:
                    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
                hard = resource.getrlimit(resource.RLIMIT_AS)[1]
                resource.setrlimit(resource.RLIMIT_AS, (size + margin * 2**20, hard))


    original = fastdca.train.train
    fastdca.train.train = lambda *a, callbacks=(), **k: original(*a, callbacks=[*callbacks, LimitMemory()], **k)
    sys.exit(main(argv))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux): macOS does "
                    "not enforce an address-space limit, Windows has neither")
def test_a_real_out_of_memory_under_an_address_space_limit(tiny_model_dir, tmp_path):
    """Micro-batches of 32 rows of ~480 tokens under a 64 MB address-space margin (the step needs 128-256 MB, one of
    16 rows less than 64, measured): the CPU allocator fails, the error is one line, and the same command with
    --auto-batch-size settles on a smaller micro-batch of the same 32 examples a step."""
    script = tmp_path / "driver.py"
    script.write_text(REAL_DRIVER)
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"instruction": "Name the letters: " + " ".join(["Anna Bell"] * 45), "input": "",
                                 "output": "AB"}] * 32))
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--max-length", "512", "--output", str(out),
            "--adapter-layers", "2", "--adapter-len", "4", "--batch-size", "32", "--max-steps", "1"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")

    def command(*extra):
        """The command in a process of its own, as a user runs it again (the first one's freed memory stays in
        its address space: the second under the first's limit could fail to map the model's file)."""
        return subprocess.run([sys.executable, str(script), "64", *argv, *extra], capture_output=True, text=True,
                              timeout=600, env=env)

    result = command()
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    errors = [line for line in result.stderr.split("\n") if line.startswith("fastdca train: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("fastdca train: error: out of CPU memory (RAM) in training step 1, a micro-batch of 32 "
                                "examples padded to "), errors[0]
    assert "--batch-size 16 --grad-accum 2 (the same 32 examples a step)" in errors[0]
    result = command("--auto-batch-size")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    settled = json.loads((out / "run.json").read_text())["auto_batch_size"]
    assert settled["batch_size"] < 32 and settled["batch_size"] * settled["grad_accum"] == 32
    assert (f"--auto-batch-size: a step fits at micro-batch {settled['batch_size']}, {settled['grad_accum']} "
            "accumulated (32 examples a step)") in result.stdout
