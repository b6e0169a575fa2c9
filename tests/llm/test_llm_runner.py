"""Profiling and chatting with an LLM bundle (tiny Llama, ONNX GenAI), each artifact in a fresh torch-free process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.errors import ConfigError, InputError
from edgeship.manifest import load_bundle
from edgeship.profiling.llm.bench import LLMRunConfig, is_llm_bundle, profile_llm
from edgeship.profiling.llm.chat import ChatTokenizer, chat
from edgeship.profiling.llm.results import LLMProfileResult, render

pytestmark = pytest.mark.needs_export


def test_profile_measures_every_metric_torch_free(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    cfg = LLMRunConfig(prompt_lengths=(32, 128), new_tokens=128, energy="estimate", idle_seconds=0)
    res = profile_llm(tiny_llama_bundle, artifact="onnx/int4-weight", config=cfg, json_path=tmp_path / "r.json")
    assert res.ok, res.results[0].error
    r = res.results[0]
    assert r.torch_free and r.runtime["runtime"] == "onnxruntime-genai"
    assert [p.prompt_tokens for p in r.prompts] == [32, 128] and all(p.ttft_ms > 0 for p in r.prompts)
    assert all(p.prefill_tokens_per_s == pytest.approx(p.prompt_tokens / (p.ttft_ms / 1e3)) for p in r.prompts)
    assert r.decode_tokens == 128 and len(r.token_ns) == 128 and r.decode_tokens_per_s and r.decode_tokens_per_s > 0
    assert r.decode_retained is not None and r.decode_retained > 0
    assert r.load_seconds and r.load_seconds > 0 and r.peak_rss_mb and r.peak_rss_mb >= (r.rss_after_load_mb or 0)
    assert r.energy is not None and r.energy.estimated and r.joules_per_token and r.joules_per_token > 0
    assert r.decode_token_ms is not None and r.decode_token_ms.count == 128
    assert r.max_context == 512 and r.kv_cache_bytes_per_token == 512
    split = r.resident_at_end  # what the peak was made of, read before the runtime closed
    assert split is not None and split.anon_mb > 0 and split.libraries_mb > 5 and split.total_mb <= r.peak_rss_mb + 0.5
    assert f"onnx/int4-weight: at the end {split.total_mb:.0f} MB = {split.anon_mb:.0f} its own" in render(res)
    assert LLMProfileResult.from_dict(json.loads((tmp_path / "r.json").read_text())) == res


def test_genai_reset_drops_the_old_kv_cache_before_allocating_the_new(tiny_llama_bundle: Path) -> None:
    # each og.Generator holds a KV buffer of the whole context (94 MB for SmolLM2-135M at 2048): replaced in one
    # assignment, the old one lived on while the new one allocated, and every profile peaked one cache higher
    from edgeship.profiling.llm.onnx import GenAIRuntime

    b = load_bundle(tiny_llama_bundle)
    art = b.manifest.artifact("onnx/int4-weight")
    rt = GenAIRuntime(b.path_of(art), art.runtime, threads=1)
    real, held = rt._og, []

    class Og:  # the module, with a Generator that notes what the runtime still held when a new one was made
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def Generator(self, model: object, params: object) -> object:  # onnxruntime_genai's name
            held.append(rt._generator)
            return real.Generator(model, params)

    rt._og = Og()
    first = rt.append([5, 6, 7])
    rt.reset()
    rt.reset()
    assert held == [None, None] and rt.position == 0
    assert (rt.append([5, 6, 7]) == first).all()  # the fresh cache gives the same logits
    rt.close()


def test_prompt_past_the_context_is_refused_before_running(tiny_llama_bundle: Path) -> None:
    with pytest.raises(InputError, match=r"\(400 tokens, --prompt-lengths\) plus --new-tokens 128 = 528 tokens exceed "
                                         r"the artifact's max context 512"):
        profile_llm(tiny_llama_bundle, config=LLMRunConfig(prompt_lengths=(400,), new_tokens=128))
    with pytest.raises(InputError, match="--new-tokens 600 = 664 tokens exceed"):
        profile_llm(tiny_llama_bundle, config=LLMRunConfig(prompt_lengths=(64,), new_tokens=600))
    with pytest.raises(ConfigError, match="--new-tokens must be >= 10"):
        LLMRunConfig(new_tokens=5)


def test_cli_profile_dispatches_llm_bundles(tiny_llama_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert is_llm_bundle(tiny_llama_bundle)
    rc = main(["profile", str(tiny_llama_bundle), "--artifact", "onnx/fp32", "--prompt-lengths", "16", "--new-tokens",
               "20", "--energy", "off", "--idle-seconds", "0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "onnx/fp32" in out.out and "decode tok/s" in out.out
    rc = main(["profile", str(tiny_llama_bundle), "--prompt-lengths", "600"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "max context 512" in err


def test_chat_applies_the_template_and_streams(tiny_llama_bundle: Path) -> None:
    b = load_bundle(tiny_llama_bundle)
    tok = ChatTokenizer(b)
    assert tok.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    pieces: list[str] = []
    reply = chat(tiny_llama_bundle, "onnx/fp32", "What is the capital of France?", 12, 1, pieces.append)
    assert reply == "".join(pieces)
    # the same greedy tokens as the export-time PyTorch reference for this prompt (fp32 artifact)
    held = json.loads((b.root / "llm/heldout.json").read_text())
    ref = held["reference_continuations"][0]
    eos = set(b.manifest.llm["generation"]["eos_token_ids"])  # type: ignore[index]
    expected = []
    for t in ref[:12]:
        if t in eos:
            break
        expected.append(t)
    assert reply == tok.decode(expected)


def test_chat_past_the_context_is_one_line(tiny_llama_bundle: Path, capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    from edgeship.bundle import pack

    # packed: the .zip is unpacked and verified first, then the same check answers
    rc = main(["chat", str(pack(tiny_llama_bundle, tmp_path / "b.zip")), "--artifact", "onnx/int4-weight",
               "--prompt", "hello", "--new-tokens", "1000"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1
    assert "plus --new-tokens 1000 exceed onnx/int4-weight's max context 512" in err


def test_genai_prefill_returns_one_position_of_logits_and_the_same_numbers(tiny_llama_bundle: Path,
                                                                           tmp_path: Path) -> None:
    """The LM head runs on the last position only (``logits`` [batch, 1, vocab]): the GenAI runtime takes that shape
    and its logits are those of the builder's every-position graph, at the prompt and at each decoded token."""
    import shutil

    import numpy as np
    import onnx

    from edgeship.profiling.llm.onnx import GenAIRuntime

    art = load_bundle(tiny_llama_bundle).manifest.artifacts[0]
    folder = tiny_llama_bundle / art.path
    every = tmp_path / "every"
    shutil.copytree(folder, every)
    m = onnx.load(str(every / "model.onnx"), load_external_data=False)
    (sl,) = [n for n in m.graph.node if n.name == "/model/last_position/Slice"]
    head = next(n for n in m.graph.node if n.input and n.input[0] == sl.output[0])
    head.input[0] = sl.input[0]  # back to the builder's graph: the head reads every position
    m.graph.node.remove(sl)
    logits = next(o for o in m.graph.output if o.name == "logits").type.tensor_type.shape.dim[1]
    logits.dim_param = "sequence_length"
    onnx.save(m, str(every / "model.onnx"))
    prompt = list(range(5, 45))
    out = {}
    for name, d in (("last", folder), ("every", every)):
        rt = GenAIRuntime(d, art.runtime, threads=1)
        try:
            out[name] = (rt.append(prompt), [rt.append([t]) for t in (7, 8, 9)])
        finally:
            rt.close()
    shipped = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert next(o for o in shipped.output if o.name == "logits").type.tensor_type.shape.dim[1].dim_value == 1
    np.testing.assert_allclose(out["last"][0], out["every"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["last"][1], out["every"][1], rtol=1e-5, atol=1e-5)


def test_genai_long_prompts_prefill_in_chunks_with_the_same_logits(tiny_llama_bundle: Path) -> None:
    """A prompt past PREFILL_CHUNK goes in several append_tokens calls (bounded attention scratch): the logits are
    those of one call."""
    import numpy as np

    from edgeship.profiling.llm import onnx as genai

    art = load_bundle(tiny_llama_bundle).manifest.artifacts[0]
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 384, genai.PREFILL_CHUNK + 90)]
    rt = genai.GenAIRuntime(tiny_llama_bundle / art.path, art.runtime, threads=1)
    calls: list[int] = []
    try:
        chunked = rt.append(prompt)
        rt.reset()
        real = rt._generator

        class Recording:  # the pybind generator's attributes are read-only: wrap it
            def append_tokens(self, ids: np.ndarray) -> None:
                calls.append(len(ids))
                real.append_tokens(ids)

            def get_logits(self) -> np.ndarray:
                return np.asarray(real.get_logits())

        rt._generator = Recording()
        assert np.array_equal(rt.append(prompt), chunked)
        rt.reset()
        rt._generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        whole = np.asarray(rt._generator.get_logits(), dtype=np.float32).reshape(-1, 384)[-1]
    finally:
        rt.close()
    assert calls == [genai.PREFILL_CHUNK, 90]
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
