import os

import pytest
import torch

# No GPU: the Triton kernels run under Triton's interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _round_bf16_to_nearest_even():
    """Make the interpreter round float32 -> bfloat16 to nearest even, as Triton does on GPUs.

    Triton 3.9's interpreter truncates instead (docs/DESIGN.md section 5): up to 2 units of rounding per
    stored element, all of one sign, so bf16 kernel results under the interpreter would carry an error
    a GPU does not make. tests/kernels/test_kernels.py checks that this conversion equals torch's.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter._convert_float

    def convert_float(data, src_dtype, dst_dtype, rounding_mode):
        if src_dtype == tl.float32 and dst_dtype == tl.bfloat16:
            bits = data.astype(np.float32, order="C").view(np.uint32)
            bits = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
            return (bits >> np.uint32(16)).astype(np.uint16)
        return truncating(data, src_dtype, dst_dtype, rounding_mode)

    interpreter._convert_float = convert_float


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest_even()


def pytest_terminal_summary(terminalreporter):
    """The worst relative error per backend, dtype and tensor that the reference checks saw in this run."""
    from backend_check import WORST

    if WORST:
        terminalreporter.section("worst relative errors against the float64 reference")
        for (backend, dtype, name), err in sorted(WORST.items()):
            terminalreporter.write_line(f"{backend:7s} {dtype:9s} {name:6s} {err:.2e}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 3-layer random LLaMA with a 300-token byte-level BPE trained on the task's own text."""
    path = tmp_path_factory.mktemp("tiny-llama")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fastdca.tasks import LetterConcatenation

    task = LetterConcatenation(n_train=200, n_test=10)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([e.prompt + e.target for e in task.examples("train")],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", model_max_length=512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
