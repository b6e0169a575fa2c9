"""Loading causal LMs: architecture detection, tokenizer / chat template checks, LoRA adapters, GGUF refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgeship.errors import ModelLoadError
from edgeship.llm_models import SUPPORTED_ARCHITECTURES, is_causal_lm, load_llm

pytestmark = pytest.mark.needs_export


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_causal_lm_is_detected_from_config(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    assert is_causal_lm(tiny_llama_dir)
    assert not is_causal_lm(tiny_bert_dir)
    assert is_causal_lm(tmp_path / "model.gguf")  # a GGUF always goes to the LLM pipeline (which checks it)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_gemma3_dir"])
def test_supported_families_load_with_tokenizer(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    d = request.getfixturevalue(fixture)
    llm = load_llm(d, workdir=tmp_path)
    assert llm.architecture in SUPPORTED_ARCHITECTURES
    assert llm.hf_dir == d and llm.eos_token_ids == [2]
    assert "<|im_start|>assistant" in llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                        add_generation_prompt=True, tokenize=False)


def test_unsupported_architecture_lists_the_supported_ones(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"MambaForCausalLM is not supported.*LlamaForCausalLM.*Phi3ForCausalLM"):
        load_llm(d, workdir=tmp_path)


def test_a_config_that_ties_a_head_the_weights_do_not(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """config.json says tied, the file holds a different lm_head.weight: transformers keeps them apart (with a
    warning) while the ONNX GenAI builder and litert-torch follow the config and read the table as the head
    (measured on the tiny Llama: top-1 0.008 against PyTorch, failing late on the fidelity floor). Refused at load."""
    d = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # the fixture's head is its own
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(ModelLoadError, match=r'tie_word_embeddings=true but .* set "tie_word_embeddings": false') as e:
        load_llm(d, workdir=tmp_path)
    assert "\n" not in str(e.value)


def test_missing_tokenizer_is_one_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / f).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no usable tokenizer") as e:
        load_llm(d, workdir=tmp_path)
    assert "\n" not in str(e.value)


def test_missing_chat_template_is_an_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_llm(d, workdir=tmp_path)


def _lora(base_dir: Path, out: Path, base_name: str, hidden: int | None = None) -> Path:
    """A real PEFT LoRA adapter on q_proj/v_proj with non-zero B (so merging changes the weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if hidden is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    else:  # the same family with another width: shapes cannot match
        model = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=hidden, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8))
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_adapter_is_checked_and_merged(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch

    plain = load_llm(tiny_llama_dir, workdir=tmp_path)
    ad = _lora(tiny_llama_dir, tmp_path / "ad", base_name=f"someone/{tiny_llama_dir.name}")
    merged = load_llm(tiny_llama_dir, workdir=tmp_path, adapter=ad)
    assert merged.adapter is not None and merged.adapter["rank"] == 4 and merged.adapter["modules"] == 4
    assert merged.hf_dir == tmp_path / "merged-hf" and (merged.hf_dir / "config.json").is_file()
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(plain.model.state_dict()[q0], merged.model.state_dict()[q0])
    assert not any("lora" in k for k in merged.model.state_dict())


def test_adapter_for_another_base_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ad = _lora(tiny_llama_dir, tmp_path / "ad", base_name="HuggingFaceTB/SmolLM2-360M")
    with pytest.raises(ModelLoadError, match="trained on 'HuggingFaceTB/SmolLM2-360M', not this model"):
        load_llm(tiny_llama_dir, workdir=tmp_path, adapter=ad)


def test_adapter_with_wrong_shapes_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ad = _lora(tiny_llama_dir, tmp_path / "ad", base_name=tiny_llama_dir.name, hidden=32)
    with pytest.raises(ModelLoadError, match=r"does not match the model: .*q_proj.*size 32.*has 64"):
        load_llm(tiny_llama_dir, workdir=tmp_path, adapter=ad)


def _gguf(path: Path, arch: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_architecture_transformers_cannot_dequantize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="GGUF architecture 'rwkv6' cannot be dequantized .*llama"):
        load_llm(_gguf(tmp_path / "m.gguf", "rwkv6"), workdir=tmp_path)


def test_gguf_architecture_we_do_not_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="GGUF architecture 'mamba' is not supported for LLM export"):
        load_llm(_gguf(tmp_path / "m.gguf", "mamba"), workdir=tmp_path)


def test_truncated_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_CACHE_DIR", str(tmp_path / "cache"))
    p = _gguf(tmp_path / "m.gguf", "llama")
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_llm(p, workdir=tmp_path)
