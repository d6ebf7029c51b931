"""The `fastdca` command: train, eval, inspect, demo, sweep, check and lm-eval."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from fastdca.config import COMPILE_MODES

LM_EVAL_COMMAND = "lm-eval"


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [LM_EVAL_COMMAND]:
        # the rest is lm-eval's own command line, passed through unparsed (argparse would claim its options)
        args = argparse.Namespace(command=LM_EVAL_COMMAND, harness_args=argv[1:], run=run_lm_eval)
    else:
        args = parser.parse_args(argv)
    from fastdca.errors import TrainingDiverged, TrainingInterrupted

    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        if getattr(args, "dtype", None) is not None:
            from fastdca.commands.models import resolve_dtype

            args.dtype = str(resolve_dtype(args.dtype)).replace("torch.", "")
        return args.run(args)
    except TrainingInterrupted as interrupted:
        _exit(parser, interrupted.exit_code, f"fastdca {args.command}: {interrupted}\n")
    except TrainingDiverged as diverged:
        _exit(parser, 1, f"fastdca {args.command}: error: {diverged}\n")
    except (ValueError, RuntimeError, MemoryError) as error:
        _exit(parser, 2, f"fastdca {args.command}: error: {_as_out_of_memory(error, args.command)}\n")
    except OSError as error:     # a file or folder the command could not read or write
        where = f": {error.filename}" if error.filename else ""
        _exit(parser, 2, f"fastdca {args.command}: error: {error.strerror or error}{where}\n")
    except KeyboardInterrupt:    # a second Ctrl-C, while the first one's checkpoint was being written
        _exit(parser, 130, f"fastdca {args.command}: interrupted again: stopped at once, without a new checkpoint "
                           "(the folder's earlier checkpoints are whole; run the same command to resume)\n")
    finally:
        warnings.formatwarning = previous_format


def _exit(parser, status: int, message: str):
    """Print the error on a line of its own (progress bars still open are closed first, ending their line)
    and exit with `status`."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:       # a bar half torn down by the error: its line matters less than the message
            pass
    parser.exit(status, message)


def _as_out_of_memory(error, command: str):
    """An out-of-memory error that fastdca's steps did not already explain (fastdca.out_of_memory.OutOfMemory), as one
    that says what ran out and what `command` can change; any other error as it is."""
    from fastdca.out_of_memory import OutOfMemory, out_of_memory_cause, what_ran_out

    cause = out_of_memory_cause(error)
    if cause is None or isinstance(error, OutOfMemory):
        return error
    what, allocation = what_ran_out(cause)
    return OutOfMemory(what, f"in fastdca {command}", command=command, stage="", allocation=allocation)


def _one_line_warning(message, category, filename, lineno, line=None):
    """Warnings as the CLI prints them: one plain line, without the file and code line of where they arose."""
    return f"fastdca: warning: {message}\n"


def _add_command(commands, name, **kwargs):
    """A subcommand whose --help shows every option's default."""
    return commands.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from fastdca.config import DCAConfig

    defaults = DCAConfig()
    parser = argparse.ArgumentParser(prog="fastdca", description="DCA fine-tuning of LLaMA-family models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = _add_command(commands, "train", help="fine-tune a model with DCA on a task")
    _model_arguments(train)
    _task_arguments(train)
    train.add_argument("--output", required=True, help="output directory (adapter, checkpoints, loss history)")
    dca = train.add_argument_group("DCA hyper-parameters (defaults: the paper's)")
    dca.add_argument("--adapter-layers", type=int, default=defaults.adapter_layers, help="L")
    dca.add_argument("--adapter-len", type=int, default=defaults.adapter_len, help="M")
    dca.add_argument("--causal-len", type=int, default=defaults.causal_len, help="H")
    dca.add_argument("--causal-layers", type=int, default=None, help="L' (default: the task's, else L)")
    dca.add_argument("--alpha", type=float, default=defaults.alpha)
    dca.add_argument("--gate-fn", choices=("tanh", "identity"), default=defaults.gate_fn)
    dca.add_argument("--variance", choices=("sample", "token"), default=defaults.variance)
    dca.add_argument("--xg-space", choices=("head", "hidden"), default=defaults.xg_space)
    dca.add_argument("--variance-scope", choices=("global", "rank"), default=defaults.variance_scope)
    opt = train.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=float, default=5.0)
    opt.add_argument("--max-steps", type=int, default=-1, help="if > 0, overrides --epochs")
    opt.add_argument("--batch-size", type=int, default=4)
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--max-length", type=int, default=256)
    opt.add_argument("--packing", action="store_true",
                     help="no padding: each micro-batch's --batch-size examples end to end in one row, attended "
                          "separately (the same examples and loss as padded batches, fewer tokens computed)")
    opt.add_argument("--compile", action="store_true",
                     help="torch.compile the model (Trainer's torch_compile, Inductor): the patched model compiles "
                          "without graph breaks; the first steps pay the compilation. Rows are padded to a few "
                          "widths (16, 32, 64, ... up to --max-length) so that it compiles once per width; on a GPU "
                          "the mode is reduce-overhead (CUDA graphs)")
    opt.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                     help="torch.compile mode with --compile (default: reduce-overhead on CUDA, default elsewhere)")
    opt.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute each decoder layer in the backward instead of keeping its activations "
                          "(non-reentrant; the same loss and gradients, less memory, a slower step)")
    opt.add_argument("--auto-batch-size", action="store_true",
                     help="out of memory: halve the micro-batch and double --grad-accum (the same examples a step) "
                          "until a step fits, not below 2 (the causal loss is a variance over the micro-batch); the "
                          "micro-batch it settles on is printed and kept in OUTPUT/run.json, where a resume starts")
    opt.add_argument("--fsdp", action="store_true",
                     help="shard the model over the launched processes (FSDP2 through accelerate, GPUs only; "
                          "launch with torchrun or accelerate launch): each decoder layer is one unit, the "
                          "adapter and its checkpoints are saved whole; see docs/integration.md, Multi-GPU")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--save-steps", type=int, default=500)
    opt.add_argument("--logging-steps", type=int, default=10)
    opt.add_argument("--limit", type=positive_int, default=None, help="use only the first N training examples")
    opt.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has checkpoints")
    opt.add_argument("--overwrite", action="store_true",
                     help="replace the run OUTPUT holds (its adapter and checkpoints), finished or not, whatever its "
                          "settings; without it a finished run is never trained over")
    opt.add_argument("--resume-anyway", action="store_true",
                     help="resume OUTPUT's unfinished run although settings differ (recorded in OUTPUT/run.json)")
    opt.add_argument("--nonfinite", choices=("stop", "skip"), default="stop",
                     help="at a non-finite loss or gradient: stop (default), or skip the step (and stop after "
                          "10 in a row)")
    train.set_defaults(run=run_train)

    evaluate = _add_command(commands, "eval", help="accuracy of a model (and adapter) on a task")
    _model_arguments(evaluate)
    _task_arguments(evaluate)
    evaluate.add_argument("--adapter", default=None, help="adapter directory written by `fastdca train`")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N examples")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--auto-batch-size", action="store_true",
                          help="out of memory: halve the batch until it fits (the batches already generated are kept)")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the task's")
    evaluate.add_argument("--output", default=None, help="predictions JSONL (default: predictions.jsonl in the "
                          "adapter directory; without --adapter none are written unless --output is given)")
    evaluate.add_argument("--xg-stats", action="store_true",
                          help="also measure Var(X_G) across the evaluated samples per adapted layer (needs "
                               "--adapter): the unbiased variance over samples of each sample's X_G (before "
                               "o_proj) averaged over its prompt tokens, then averaged over heads and dims, i.e. "
                               "the causal loss's variance='sample' over the whole split; printed as a table and "
                               "written beside the predictions as <name>.xg_stats.json")
    evaluate.set_defaults(run=run_eval)

    maps = _add_command(
        commands, "inspect", help="the DCA paper's Fig. 3: each token's attention to the adapter tokens, for one or two "
                        "prompts, and how far X_G differs between them")
    _model_arguments(maps)
    maps.add_argument("--adapter", default=None,
                         help="adapter directory written by `fastdca train` (default: a freshly patched model "
                              "with the default DCAConfig, whose zero gates make every probability 0)")
    maps.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                         help="a prompt; give it twice to compare two prompts side by side")
    maps.add_argument("--template", action="store_true",
                         help="wrap each prompt in the instruction template the tasks use")
    maps.add_argument("--layer", type=int, default=None,
                         help="decoder layer index to draw, an adapted one (default: the last adapted layer)")
    maps.add_argument("--head", type=int, default=None,
                         help="query head to draw, its signed A = g * softmax(...) on a red-blue scale (default: "
                              "the mean over heads of |A|, one map that reads at a glance and in which heads "
                              "whose gates differ in sign do not cancel; the JSON holds every head)")
    maps.add_argument("--output", default="fastdca-inspect", metavar="PREFIX",
                         help="writes PREFIX.png (the heatmaps) and PREFIX.json (every head's probabilities, "
                              "the gates, and per adapted layer the X_G difference); default fastdca-inspect")
    maps.set_defaults(run=run_inspect)

    demo = _add_command(commands, "demo", help="SmolLM2-135M on Letter Concatenation, before and after DCA")
    demo.add_argument("--model", default="smollm2", help="model directory (default: the embedded SmolLM2-135M)")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--n-test", type=int, default=100, help="held-out names evaluated")
    demo.add_argument("--output", default="fastdca-demo", help="output directory")
    demo.add_argument("--auto-batch-size", action="store_true",
                      help="out of memory: halve the micro-batch and double the accumulation (the same examples a "
                           "step), and halve the evaluation's batches, until they fit")
    demo.add_argument("--overwrite", action="store_true",
                      help="train again although OUTPUT holds this demo's finished run (by default it is reused)")
    demo.set_defaults(run=run_demo)

    sweep = _add_command(commands, "sweep", help="a grid over DCAConfig fields and seeds: accuracy mean ± std, plots")
    sweep.add_argument("--model", required=True,
                       help="Hugging Face model directory, or 'smollm2' for the embedded SmolLM2-135M-Instruct")
    _task_arguments(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                       help="a DCAConfig field and its values (repeat for more fields; one value fixes a field)")
    sweep.add_argument("--seeds", type=int, nargs="+", default=[0])
    sweep.add_argument("--steps", type=int, default=150)
    sweep.add_argument("--batch-size", type=int, default=8)
    sweep.add_argument("--lr", type=float, default=1e-2)
    sweep.add_argument("--max-length", type=int, default=256)
    sweep.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N test examples")
    sweep.add_argument("--auto-batch-size", action="store_true",
                       help="out of memory: halve the micro-batch and double the accumulation (the same examples a "
                            "step), and halve the evaluation's batches, until they fit")
    sweep.add_argument("--output", required=True, help="sweep directory: results.jsonl, summary.md, sweep.png, runs/")
    sweep.set_defaults(run=run_sweep)

    check = _add_command(commands, "check", help="self-test: versions, numerics against the reference, GPU speed")
    check.add_argument("--interpret", action="store_true",
                       help="on a CPU, check the Triton kernels under Triton's interpreter (slow)")
    check.add_argument("--no-speed", action="store_true", help="skip the timings (CUDA only)")
    check.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON to PATH")
    check.set_defaults(run=run_check)

    # main() hands everything after `lm-eval` to the harness before this parser sees it; listed for --help
    commands.add_parser(LM_EVAL_COMMAND, add_help=False,
                        help="score an adapter with lm-evaluation-harness: `fastdca lm-eval --model fastdca "
                             "--model_args pretrained=BASE,adapter=ADAPTER ...`, the rest as lm-eval's own "
                             "arguments (needs pip install \"fastdca[eval]\")")
    return parser


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of examples or tokens; 0 or negative would silently
    mean "all but" or nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _model_arguments(parser):
    from fastdca.commands.models import DTYPE_NAMES

    parser.add_argument("--model", required=True,
                        help="Hugging Face model directory, or 'smollm2' for the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                        help="auto: bfloat16 on a CUDA GPU that supports it, else float16; float32 on the CPU")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes nf4")
    quant.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes int8")


def _task_arguments(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    from fastdca.tasks import task_names

    source.add_argument("--task", help=f"a task name: {', '.join(task_names())}")
    source.add_argument("--data", help="a data file in the LLM-Adapters JSON/JSONL format")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a keyword of the task, e.g. train_variants=second_last, n_train=1200 or n_test=400 "
                             "(repeatable; give eval the options the adapter was trained with to score the same "
                             "held-out items)")


def resolve_task(args):
    from fastdca.tasks.options import parse_task_options
    from fastdca.tasks import get_task

    options = parse_task_options(args.task_option)
    return get_task(Path(args.data), **options) if args.data else get_task(args.task, **options)


def load(args):
    import torch

    from fastdca.commands.models import load_model, load_smollm2

    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        if args.load_in_4bit or args.load_in_8bit:
            raise ValueError("--load-in-4bit/--load-in-8bit need a model directory, not the embedded smollm2")
        return load_smollm2(dtype=dtype)
    if not getattr(args, "fsdp", False):
        return load_model(args.model, dtype=dtype, load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit)
    if args.load_in_8bit:
        raise ValueError("--fsdp cannot shard bitsandbytes' 8-bit weights; use --load-in-4bit (nf4) or no "
                         "quantisation with --fsdp")
    # nf4 is quantised on the process's own GPU, packed in the compute dtype so that FSDP2 shards it; an
    # unquantised model is loaded on the CPU and FSDP2 moves each rank's shard to its GPU
    return load_model(args.model, dtype=dtype, load_in_4bit=args.load_in_4bit,
                      **({"quant_storage": dtype} if args.load_in_4bit else {"device": "cpu"}))


def run_train(args) -> int:
    from fastdca.config import DCAConfig
    from fastdca.hf import describe, patch
    from fastdca.train import TrainSettings, is_rank_zero, train

    task = resolve_task(args)
    examples = task.examples("train")
    if args.limit is not None:
        examples = examples[: args.limit]
    causal_layers = args.causal_layers
    if causal_layers is None:
        causal_layers = min(task.causal_layers or args.adapter_layers, args.adapter_layers)
    config = DCAConfig(adapter_layers=args.adapter_layers, adapter_len=args.adapter_len,
                       causal_len=args.causal_len, causal_layers=causal_layers, alpha=args.alpha,
                       gate_fn=args.gate_fn, variance=args.variance, xg_space=args.xg_space,
                       variance_scope=args.variance_scope)
    settings = TrainSettings(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, learning_rate=args.lr, max_length=args.max_length,
                             seed=args.seed, save_steps=args.save_steps, logging_steps=args.logging_steps,
                             bf16=args.dtype == "bfloat16", fp16=args.dtype == "float16", nonfinite=args.nonfinite,
                             packing=args.packing, compile=args.compile, compile_mode=args.compile_mode,
                             gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp,
                             auto_batch_size=args.auto_batch_size)
    if args.fsdp:
        from fastdca.train.fsdp import check_launch

        check_launch()      # before the model loads
    model, tokenizer = load(args)
    from transformers import set_seed

    set_seed(args.seed)     # before the adapter's prompts are drawn: the same command gives the same adapter
    patch(model, config)
    print(describe(model))
    history = train(model, tokenizer, examples, args.output, config=config, settings=settings,
                    resume=not args.no_resume, overwrite=args.overwrite, resume_anyway=args.resume_anyway,
                    model_name=_model_name(args))
    if is_rank_zero():
        last = history[-1] if history else {}
        print(f"adapter saved in {args.output}; last logged ce={last.get('ce')} "
              f"causal_loss={last.get('causal_loss')}")
    return 0


def _model_name(args) -> str:
    """The model a run trains, as its run record names it: the embedded name or the folder's absolute path,
    with the dtype and quantisation."""
    name = args.model if args.model == "smollm2" else str(Path(args.model).resolve())
    quantised = ", 4-bit" if args.load_in_4bit else ", 8-bit" if args.load_in_8bit else ""
    return f"{name} ({args.dtype}{quantised})"


def run_eval(args) -> int:
    from fastdca.commands.eval import evaluate
    from fastdca.hf import load_adapter

    task = resolve_task(args)
    examples = task.examples(args.split)
    if args.limit is not None:
        examples = examples[: args.limit]
    if args.xg_stats and args.adapter is None:
        raise ValueError("--xg-stats needs --adapter: a model without an adapter has no X_G")
    output = args.output or (str(Path(args.adapter) / "predictions.jsonl") if args.adapter else None)
    if output is not None and Path(output).is_dir():
        raise ValueError(f"--output {output} is a folder; give the path of the predictions file to write")
    model, tokenizer = load(args)
    if args.adapter is not None:
        load_adapter(model, args.adapter)  # patches the model with the adapter's own config
    result = evaluate(model, tokenizer, task, examples, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, predictions_path=output, auto_batch_size=args.auto_batch_size)
    summary = {"task": task.name, "split": args.split, **result, "predictions": output}
    if args.xg_stats:
        from fastdca.commands.eval import write_json, xg_variance, xg_variance_table

        stats = xg_variance(model, tokenizer, [ex.prompt for ex in examples], batch_size=args.batch_size,
                            auto_batch_size=args.auto_batch_size)
        stats_path = str(Path(output).with_suffix(".xg_stats.json"))
        write_json(stats_path, {"task": task.name, "split": args.split, "adapter": args.adapter, **stats})
        print(xg_variance_table(stats))
        summary["xg_stats"] = stats_path
    print(json.dumps(summary))
    return 0


def run_inspect(args) -> int:
    from fastdca.commands.attention_maps import adapter_attention_maps, write_attention_maps, xg_difference_table
    from fastdca.config import DCAConfig
    from fastdca.hf import load_adapter, patch
    from fastdca.tasks import format_prompt

    if not 1 <= len(args.prompt) <= 2:
        raise ValueError(f"--prompt: give one or two prompts, got {len(args.prompt)}")
    prompts = [format_prompt(p) if args.template else p for p in args.prompt]
    model, tokenizer = load(args)
    if args.adapter is not None:
        load_adapter(model, args.adapter)
    else:
        layers = min(DCAConfig().adapter_layers, model.config.num_hidden_layers)
        patch(model, DCAConfig(adapter_layers=layers))
        print("no --adapter: a freshly patched model, whose zero gates make every adapter probability 0")
    maps = adapter_attention_maps(model, tokenizer, prompts, layer=args.layer, head=args.head)
    png, json_path = write_attention_maps(maps, args.output)
    if maps["xg_difference"]:
        print("X_G (mean over tokens) of prompt 1 vs prompt 2, per adapted layer:")
        print(xg_difference_table(maps))
    print(json.dumps({"layer": maps["layer"], "head": maps["head"], "png": str(png), "json": str(json_path)}))
    return 0


def run_demo(args) -> int:
    from fastdca.commands.demo import demo

    demo(model=args.model, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
         n_test=args.n_test, output_dir=args.output, overwrite=args.overwrite, auto_batch_size=args.auto_batch_size)
    return 0


def run_sweep(args) -> int:
    from fastdca.commands.sweep import parse_grid, run_sweep as sweep, summary_table

    grid = parse_grid(args.grid)
    task = resolve_task(args)
    rows = sweep(args.model, task, grid, args.seeds, args.output, steps=args.steps,
                 batch_size=args.batch_size, learning_rate=args.lr, max_length=args.max_length,
                 test_limit=args.limit, auto_batch_size=args.auto_batch_size)
    print(summary_table(rows))
    return 0


def run_lm_eval(args) -> int:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise RuntimeError('lm-evaluation-harness is not installed: pip install "fastdca[eval]"')
    from fastdca.lm_eval_harness import cli

    return cli(args.harness_args)


def run_check(args) -> int:
    from fastdca.commands.check import run_check as check

    return check(interpret=args.interpret, json_path=args.json, speed=not args.no_speed)


if __name__ == "__main__":
    sys.exit(main())
