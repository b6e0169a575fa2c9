"""The int8 KV cache (``--kv-cache int8``): ONNX GenAI folders whose static cache holds a quarter of fp32's bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeship.cli import main
from edgeship.errors import ConfigError
from edgeship.llm import export_llm
from edgeship.manifest import load_bundle

pytestmark = pytest.mark.needs_export
QUIET = {"log": lambda m: None}
CONTEXT = 256


@pytest.fixture(scope="module")
def int8_kv_bundle(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kv-int8") / "b"
    export_llm(tiny_llama_dir, target="x86-64-laptop", out=out, formats=["onnx"], recipes=["fp32"],
               max_context=CONTEXT, kv_cache="int8", **QUIET)
    return out


def test_the_cache_is_int8_static_and_counted_as_such(int8_kv_bundle: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    b = load_bundle(int8_kv_bundle)
    (art,) = b.manifest.artifacts
    folder = b.root / art.path
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    caches = [v for v in [*graph.input, *graph.output] if v.name.startswith(("past_key_values.", "present."))]
    assert len(caches) == 2 * 2 * 2  # layers x (K, V) x (in, out)
    assert {v.type.tensor_type.elem_type for v in caches} == {onnx.TensorProto.INT8}
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert all({"k_quant_type", "v_quant_type"} <= {a.name for a in n.attribute} for n in gqa) and len(gqa) == 2
    # one buffer of max-context tokens: the builder turns sharing off for a quantized cache on CPU; we turn it on
    search = json.loads((folder / "genai_config.json").read_text())["search"]
    assert search["past_present_share_buffer"] is True and search["max_length"] == CONTEXT
    assert art.details["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 1  # layers x (K, V) x kv heads x head dim
    kv = art.quantization["kv_cache"]
    assert kv["dtype"] == "int8" and kv["calibration_tokens"] >= 64 and "per KV channel" in kv["how"]
    assert art.runtime["kv_cache_dtype"] == "int8"
    fid = art.llm_fidelity
    assert fid is not None and fid.passed and fid.top1_agreement >= 0.95  # fp32 weights: the cache is the only loss
    assert main(["inspect", str(int8_kv_bundle)]) == 0
    assert "128 (int8)" in capsys.readouterr().out  # KV bytes/token and the cache's type


def _logits(folder: Path, ids: list[int]) -> np.ndarray:
    from edgeship.profiling.llm.onnx import GenAIRuntime

    rt = GenAIRuntime(folder, {"kv_cache_dtype": "int8"}, threads=1)
    try:
        assert rt.info()["kv_cache"] == f"shared buffer of {CONTEXT} tokens (int8)"
        return np.stack([rt.append([i]) for i in ids])
    finally:
        rt.close()


def test_sharing_the_buffer_reads_the_int8_cache_as_the_builders_layout_does(int8_kv_bundle: Path,
                                                                              tmp_path: Path) -> None:
    """The trap behind our override: if a later onnxruntime's CPU kernel stopped reading a quantized cache in the
    shared buffer, decoding would go wrong quietly. Same tokens, same logits, either way."""
    b = load_bundle(int8_kv_bundle)
    shared = b.root / b.manifest.artifacts[0].path
    grown = tmp_path / "grown"
    shutil.copytree(shared, grown)
    cfg = json.loads((grown / "genai_config.json").read_text())
    cfg["search"]["past_present_share_buffer"] = False
    (grown / "genai_config.json").write_text(json.dumps(cfg))
    ids = json.loads((b.root / b.manifest.samples["heldout"]).read_text())["text_ids"][:96]
    a, g = _logits(shared, ids), _logits(grown, ids)
    np.testing.assert_allclose(a, g, rtol=1e-4, atol=1e-4)


def test_formats_without_an_int8_cache_are_refused_before_loading(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--kv-cache int8: the pte runtime keeps no int8 KV cache \(only onnx "
                                          r"does\).*--format onnx"):
        export_llm(tiny_llama_dir, target="pixel-8", out=tmp_path / "b", formats=["onnx", "pte"], kv_cache="int8",
                   **QUIET)
    with pytest.raises(ConfigError, match=r"unknown KV-cache type 'fp16'. Did you mean 'fp32'\? Valid: fp32, int8"):
        export_llm(tiny_llama_dir, target="pixel-8", out=tmp_path / "b", formats=["onnx"], kv_cache="fp16", **QUIET)
    assert not (tmp_path / "b").exists()


def test_encoder_exports_refuse_llm_flags(tiny_bert_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", str(tiny_bert_dir), "--target", "x86-64-laptop", "--kv-cache", "int8", "--max-context",
               "512", "-o", str(tmp_path / "b"), "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "--max-context --kv-cache: for causal LMs only" in err and "drop the flag(s)" in err
    assert not (tmp_path / "b").exists()


def test_user_calibration_texts_are_read_before_loading_and_only_for_an_int8_cache(tiny_llama_dir: Path,
                                                                                  tmp_path: Path) -> None:
    from edgeship.errors import CalibrationError

    texts = tmp_path / "mine.txt"
    texts.write_text("the quick brown fox\n")
    with pytest.raises(ConfigError, match=r"--calibration .*mine.txt: an LLM export calibrates only the int8 KV "
                                          r"cache \(--kv-cache int8\).*add --kv-cache int8"):
        export_llm(tiny_llama_dir, target="pixel-8", out=tmp_path / "b", formats=["onnx"], calibration=texts, **QUIET)
    with pytest.raises(CalibrationError, match=r"give an existing .txt .* or .jsonl"):
        export_llm(tiny_llama_dir, target="pixel-8", out=tmp_path / "b", formats=["onnx"], kv_cache="int8",
                   calibration=tmp_path / "missing.txt", **QUIET)
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:1: expected a JSON object with a 'text' field"):
        export_llm(tiny_llama_dir, target="pixel-8", out=tmp_path / "b", formats=["onnx"], kv_cache="int8",
                   calibration=tmp_path / "bad.jsonl", **QUIET)
    assert not (tmp_path / "b").exists()


def test_calibration_sequences_are_plain_and_chat_shaped(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edgeship.llm import calibration_sequences
    from edgeship.llm_models import load_llm

    llm = load_llm(tiny_llama_dir, workdir=tmp_path, log=lambda m: None)
    plain, chat = calibration_sequences(llm, 128, ["hello there", "general kenobi", "you are a bold one"])
    assert plain == tuple(llm.tokenizer("hello there general kenobi you are a bold one",
                                        add_special_tokens=False)["input_ids"])
    assert "<|im_start|>user\nhello there" in llm.tokenizer.decode(chat)  # the template's shape, its special tokens
    builtin = calibration_sequences(llm, 128)
    assert all(len(s) == 128 for s in builtin)  # the built-in text fills the context asked for
    (one,) = {len(s) for s in calibration_sequences(llm, 64, ["a single text"])[1:]}
    assert one > 0  # one text: a user turn and a short reply, still a conversation


def test_llm_exports_refuse_encoder_flags(tiny_llama_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", str(tiny_llama_dir), "--target", "x86-64-laptop", "--seq-len", "64", "--heldout", "h.txt",
               "-o", str(tmp_path / "b"), "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "--heldout --seq-len: not for causal LMs" in err and "drop the flag(s)" in err
    assert not (tmp_path / "b").exists()
