"""The hidden-state rotation before 8-bit dynamic activations (``edgeship.exporters.llm_rotate``).

It must not change what the model computes in fp32, must leave the caller's model alone, must refuse the families
and models it cannot fold, and must make per-token int8 activations lose less where a channel is an outlier (the
reason it exists). The real-model effect (SmolLM2 ``.pte`` int8) is in ``test_llm_pte_smollm2.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeship.exporters.llm_rotate import FAMILIES, hadamard, rotated, rotation  # noqa: E402

VOCAB = 256


def _tiny(kind: str, **extra: Any) -> Any:
    torch.manual_seed(0)
    common: dict[str, Any] = {**dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     initializer_range=0.08), **extra}
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[kind]
    model = cls[1](cls[0](**common)).eval()
    with torch.no_grad():  # trained norms are not all ones: make the fold do something
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize("n", [12, 48, 64, 576, 896, 960, 2048])
def test_hadamard_orders_of_real_models(n: int) -> None:
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_other_orders_fall_back_to_a_random_orthogonal() -> None:
    assert hadamard(6) is None and hadamard(14) is None
    r, how = rotation(6, seed=3)
    assert how == "random orthogonal 6"
    assert torch.allclose(r @ r.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    r2, how2 = rotation(576, seed=3)
    assert how2 == "randomized Hadamard 576" and torch.allclose(r2 @ r2.T, torch.eye(576, dtype=torch.float64))
    assert torch.equal(rotation(576, seed=3)[0], r2) and not torch.equal(rotation(576, seed=4)[0], r2)


@pytest.mark.parametrize(("kind", "extra"), [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                             ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {"head_dim": 16}),
                                             ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_the_rotated_copy_computes_the_same_function(kind: str, extra: dict[str, Any]) -> None:
    model = _tiny(kind, **extra)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    out, record = rotated(model)
    assert out is not None and record["applied"] is True, record
    assert record["residual"].endswith(str(model.config.hidden_size))
    # R3: the MLP is 96 wide, so blocks of gcd(96, 64) = 32 before each down_proj, which is still a Linear inside
    assert record["down_proj_input"].startswith("Hadamard over blocks of 32")
    assert all(layer.mlp.down_proj.block == 32 and isinstance(layer.mlp.down_proj.linear, torch.nn.Linear)
               for layer in out.model.layers)
    assert torch.allclose(_logits(out, ids), _logits(model, ids), atol=1e-4)
    # the caller's model is untouched, and the copy really changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.allclose(out.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert all(bool((n.weight == 1).all()) for n in out.modules() if type(n).__name__.endswith("RMSNorm")
               and n.weight.shape[0] == model.config.hidden_size)


def test_an_odd_mlp_width_gets_no_block_rotation() -> None:
    model = _tiny("llama", intermediate_size=95)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    out, record = rotated(model)
    assert out is not None and record["down_proj_input"] == "not rotated (MLP width 95 is odd)"
    assert all(isinstance(layer.mlp.down_proj, torch.nn.Linear) for layer in out.model.layers)
    assert torch.allclose(_logits(out, ids), _logits(model, ids), atol=1e-4)


def test_families_it_cannot_fold_are_left_alone_with_the_reason() -> None:
    cfg = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    out, record = rotated(transformers.Gemma3ForCausalLM(cfg).eval())
    assert out is None and record["applied"] is False
    assert "'gemma3_text'" in record["why"] and ", ".join(sorted(FAMILIES)) in record["why"]


def test_a_model_whose_norm_does_not_commute_is_not_rotated() -> None:
    """A LayerNorm (mean subtraction) where the family has RMSNorm: the fp32 check catches the wrong fold."""
    model = _tiny("llama")
    model.model.layers[1].input_layernorm = torch.nn.LayerNorm(model.config.hidden_size).eval()
    out, record = rotated(model)
    assert out is None and record["applied"] is False and "logits moved by" in record["why"]


def test_rotation_shrinks_the_int8_activation_error_of_an_outlier_channel() -> None:
    """Norm weights 30x larger on two channels (trained LLMs have such channels): they are outliers in every linear's
    input, and per-token int8 activations spend their range on them. The rotated copy folds the norm weights into the
    linears and spreads what is left (measured: mean logit error 0.0177 plain, 0.0076 rotated)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    model = _tiny("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[:2] *= 30
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, ids)
    rot, _ = rotated(model)
    assert rot is not None

    def int8_error(m: Any) -> float:
        quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                  filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear))
        return float((_logits(m, ids) - ref).abs().mean())

    import copy

    plain, turned = int8_error(copy.deepcopy(model)), int8_error(rot)
    assert turned < 0.6 * plain, f"int8 logit error: rotated {turned:.4f} vs plain {plain:.4f}"
