"""The search for the matmuls that keep fp32 activations (edgeship.exporters.llm_keep), on a tiny random Llama:
activation grouping, the PyTorch proxy's ranking, per-node accuracy levels, and the search through the real ONNX
exporter driven by a scorer that only accepts one matmul in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from edgeship.exporters.llm_keep import activation_groups, fake_quant_blocks, rank_activations  # noqa: E402
from edgeship.manifest import LLMFidelity  # noqa: E402

pytestmark = pytest.mark.needs_export


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from edgeship.llm_models import load_llm

    return load_llm(tiny_llama_dir, workdir=tmp_path_factory.mktemp("load"))


def _prompts(tiny: Any) -> list[list[int]]:
    return [list(tiny.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in ("What is the ocean?", "Name a fruit")]


def test_fake_quant_is_symmetric_int8_per_block() -> None:
    x = torch.tensor([[0.01, -0.02, 0.03, 0.04, 100.0, -1.0, 2.0, 3.0]])
    q = fake_quant_blocks(x, 4)
    # the outlier only coarsens its own block: the first block keeps a step of 0.04 / 127
    assert torch.allclose(q[0, :4], x[0, :4], atol=0.04 / 127 / 2 + 1e-7)
    assert abs(float(q[0, 5]) - -1.0) > 0.1  # 100 / 127 per step: -1.0 is rounded to a multiple of 0.787
    assert torch.equal(fake_quant_blocks(x, 3), x)  # a width that is not a multiple of the block is left alone


def test_activations_are_grouped_by_the_tensor_their_linears_read(tiny: Any) -> None:
    groups = activation_groups(tiny.model, _prompts(tiny)[0])
    layers = tiny.model.config.num_hidden_layers
    assert len(groups) == 4 * layers + 1 and [g.index for g in groups] == list(range(len(groups)))
    assert groups[0].layers == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                "model.layers.0.self_attn.v_proj")
    assert groups[2].layers == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert groups[3].in_features == tiny.model.config.intermediate_size and groups[-1].layers == ("lm_head",)


def test_ranking_estimates_from_the_all_int8_kl(tiny: Any) -> None:
    from edgeship.llm_fidelity import torch_reference

    prompts = _prompts(tiny)
    ref = torch_reference(tiny.model, prompts[0] + prompts[1], prompts, 6)
    groups = activation_groups(tiny.model, prompts[0])
    ranked = rank_activations(tiny.model, prompts, ref.continuations, groups, 32)
    assert sorted(s.group for s in ranked) == list(range(len(groups)))
    assert [s.kl_this_fp32 for s in ranked] == sorted(s.kl_this_fp32 for s in ranked)
    # the all-int8 KL it starts from, recomputed here one prompt at a time with plain hooks

    def logprobs() -> Any:
        with torch.inference_mode():
            return torch.cat([tiny.model(input_ids=torch.tensor([p + list(c)[:-1]])).logits[0, len(p) - 1:]
                              .float().log_softmax(-1) for p, c in zip(prompts, ref.continuations, strict=True)])

    r = logprobs()
    hooks = [m.register_forward_pre_hook(lambda _m, a: (fake_quant_blocks(a[0], 32), *a[1:]))
             for m in tiny.model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        q = logprobs()
    finally:
        for h in hooks:
            h.remove()
    expected = float((r.exp() * (r - q)).sum(-1).mean())
    assert ranked[0].kl_all_int8 == pytest.approx(expected, rel=1e-3, abs=1e-6) and expected > 0


def _levels(model_onnx: Path) -> dict[str, int]:
    g = onnx.load(str(model_onnx), load_external_data=False).graph
    return {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level") for n in g.node
            if n.op_type == "MatMulNBits"}


def test_search_keeps_the_matmul_the_scorer_needs(tiny: Any, tmp_path: Path) -> None:
    """A scorer that reproduces prompt 0 only when one chosen matmul has fp32 activations: the search must find a
    kept set holding it, record every attempt, and ship the artifact with exactly that set at accuracy_level 1."""
    from edgeship.exporters.llm_base import LLMExportRequest
    from edgeship.exporters.llm_onnx import export_onnx
    from edgeship.llm_fidelity import torch_reference

    prompts = _prompts(tiny)
    ref = torch_reference(tiny.model, prompts[0] + prompts[1], prompts, 4)
    need = "model_layers.1_mlp_down_proj_MatMul/MatMulNBits"
    seen: list[dict[str, int]] = []

    def score(path: Path, runtime: dict[str, Any]) -> LLMFidelity:
        levels = _levels(path / "model.onnx")
        seen.append(levels)
        ok = levels[need] == 1
        return LLMFidelity(n_tokens=8, top1_agreement=1.0, mean_kl=0.0, perplexity=2.0, perplexity_reference=2.0,
                           n_prompts=2, new_tokens=4, greedy_identical=1 + ok, first_divergence=(None if ok else 0, None),
                           floor_top1_agreement=0.9, passed=True)

    req = LLMExportRequest(model=tiny.model, hf_dir=tiny.hf_dir, recipe="int4-weight", max_context=128, group_size=32,
                           out=tmp_path / "out", workdir=tmp_path, score=score, reference=ref,
                           options={"max_fp32_share": 1.0})  # no budget: the tiny model's ranking is arbitrary
    res = export_onnx(req)
    rec = res.quantization["affine_pass"]["fp32_activations"]
    shipped = _levels(req.out / "model.onnx")
    kept = {n for n, lv in shipped.items() if lv == 1}
    assert need in kept and rec["met"] is True
    assert kept == {f"{n.replace('/', '_').strip('_')}/MatMulNBits" for n in rec["matmuls"]}
    assert "model_lm_head_MatMul/MatMulNBits" not in kept and shipped["lm_head_MatMul/MatMulNBits"] == 4
    # the ceiling (every 4-bit matmul fp32) was built, and a smaller set that failed bounds the chosen one
    assert max(a["kept"] for a in rec["search"]) == rec["candidates"] == len(shipped) - 1
    assert any(a["kept"] < len(kept) and a["greedy_identical"] == 1 for a in rec["search"])
    assert res.quantization["activations"].startswith("int8 dynamic, fp32 on")
    assert not (tmp_path / "tries").exists()


def _scorer(need: str, calls: list[Path]) -> Any:
    """Reproduces prompt 0 only when the matmul ``need`` is a plain fp32 MatMul (int8 recipe: how it is kept)."""

    def score(path: Path, runtime: dict[str, Any]) -> LLMFidelity:
        calls.append(path)
        g = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
        ok = any(n.op_type == "MatMul" and n.name == need for n in g.node)
        return LLMFidelity(n_tokens=8, top1_agreement=1.0, mean_kl=0.0, perplexity=2.0, perplexity_reference=2.0,
                           n_prompts=2, new_tokens=4, greedy_identical=1 + ok, first_divergence=(None if ok else 0, None),
                           floor_top1_agreement=0.9, passed=True)
    return score


@pytest.mark.parametrize("share", [1.0, 0.0])
def test_int8_keeps_plain_fp32_matmuls_within_the_budget(tiny: Any, tmp_path: Path, share: float) -> None:
    """8-bit weights have no fast fp32-activation kernel: a kept matmul stays a plain fp32 MatMul. With no budget
    the search finds the one the scorer needs; with a zero budget it builds nothing past the ceiling, ships the
    all-int8 build and says the target was not met."""
    from edgeship.exporters.llm_base import LLMExportRequest
    from edgeship.exporters.llm_onnx import export_onnx
    from edgeship.llm_fidelity import torch_reference

    prompts = _prompts(tiny)
    ref = torch_reference(tiny.model, prompts[0] + prompts[1], prompts, 4)
    need, calls = "/model/layers.0/mlp/up_proj/MatMul", []
    req = LLMExportRequest(model=tiny.model, hf_dir=tiny.hf_dir, recipe="int8-dynamic", max_context=128,
                           group_size=32, out=tmp_path / "out", workdir=tmp_path, score=_scorer(need, calls),
                           reference=ref, options={"max_fp32_share": share})
    res = export_onnx(req)
    rec = res.quantization["affine_pass"]["fp32_activations"]
    shipped = onnx.load(str(req.out / "model.onnx"), load_external_data=False).graph
    plain = {n.name for n in shipped.node if n.op_type == "MatMul"} & set(rec["matmuls"] + [need])
    assert rec["candidates"] == 10 and rec["budget"]["max_share"] == share
    if share:
        assert need in rec["matmuls"] and plain == set(rec["matmuls"]) and rec["met"] is True and not res.warnings
        assert "plain fp32 MatMul" in res.quantization["activations"]
    else:
        assert rec["matmuls"] == [] and not plain and rec["met"] is False and rec["budget"]["groups"].startswith("0 ")
        assert len(res.warnings) == 1 and "within its budget (0.0% of the weights)" in res.warnings[0]
        assert len(calls) == 2  # the all-int8 build and the ceiling; nothing within a zero budget
    assert set(_levels(req.out / "model.onnx").values()) == {4}  # what stays 8-bit keeps int8 activations


def test_the_tiny_bundle_records_its_search(tiny_llama_bundle: Path) -> None:
    from edgeship.manifest import load_bundle

    a = load_bundle(tiny_llama_bundle).manifest.artifact("onnx/int4-weight")
    rec = a.quantization["affine_pass"]["fp32_activations"]
    assert rec["search"][0]["kept"] == 0 and rec["candidates"] == 10  # 2 layers x (qkv, o, gate, up, down); not the 8-bit head
    assert np.isfinite(rec["search"][0]["top1_agreement"]) and isinstance(rec["matmuls"], list)


def test_greedy_search_can_be_turned_off(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edgeship.cli import main
    from edgeship.manifest import load_bundle

    rc = main(["export", str(tiny_llama_dir), "--target", "x86-64-laptop", "-o", str(tmp_path / "b"), "--format", "onnx",
               "--quant", "int4-weight", "--max-context", "128", "--allow-degraded", "--no-greedy-search", "--quiet"])
    assert rc == 0
    a = load_bundle(tmp_path / "b").manifest.artifact("onnx/int4-weight")
    rec = a.quantization["affine_pass"]["fp32_activations"]
    assert rec["matmuls"] == [] and "--no-greedy-search" in rec["note"] and "search" not in rec
    assert set(_levels(tmp_path / "b" / a.path / "model.onnx").values()) == {4}


@pytest.mark.parametrize("share", [1.5, -0.1, "lots", None])
def test_a_bad_budget_is_refused_before_the_builder_runs(tiny: Any, tmp_path: Path, share: Any) -> None:
    from edgeship.errors import ExportError
    from edgeship.exporters.llm_base import LLMExportRequest
    from edgeship.exporters.llm_onnx import export_onnx

    req = LLMExportRequest(model=tiny.model, hf_dir=tiny.hf_dir, recipe="int4-weight", max_context=128, group_size=32,
                           out=tmp_path / "out", workdir=tmp_path, options={"max_fp32_share": share})
    with pytest.raises(ExportError, match="max_fp32_share must be a number from 0 to 1") as e:
        export_onnx(req)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
