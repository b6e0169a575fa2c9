"""The LLM export pipeline on tiny random-init models through the real ONNX GenAI builder and runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from edgeship.errors import ArtifactLoadError, ConfigError, ExportError, FidelityError
from edgeship.exporters.llm_base import LLM_EXPORTER_MODULES, LLM_EXPORTERS, LLMExportRequest
from edgeship.llm import export_llm
from edgeship.manifest import load_bundle

pytestmark = pytest.mark.needs_export
QUIET = {"log": lambda m: None}


def _target(tmp_path: Path, **llm: object) -> Path:
    """A copy of the laptop profile with some [llm] / [memory] values replaced."""
    src = Path(__file__).resolve().parents[2] / "targets/profiles/x86-64-laptop.toml"
    text = src.read_text().replace('name = "x86-64-laptop"', 'name = "test-target"')
    if "ram_gb" in llm:
        text = text.replace("ram_gb = 16", f"ram_gb = {llm.pop('ram_gb')}")
    head, _, _ = text.partition("[llm]")
    lines = [f"{k} = {json.dumps(v) if not isinstance(v, dict) else '{ ' + ', '.join(f'{json.dumps(a)} = {b}' for a, b in v.items()) + ' }'}"
             for k, v in llm.items()]
    p = tmp_path / "test-target.toml"
    p.write_text(head + "[llm]\n" + "\n".join(lines) + "\n")
    return p


def test_bundle_carries_artifacts_fidelity_tokenizer_and_generation_config(tiny_llama_bundle: Path) -> None:
    b = load_bundle(tiny_llama_bundle)  # verifies every file of every artifact
    m = b.manifest
    assert m.model["task"] == "text-generation" and m.model["architecture"] == "LlamaForCausalLM"
    assert [a.key for a in m.artifacts] == ["onnx/fp32", "onnx/int4-weight"]
    fp32, int4 = m.artifacts
    assert {"model.onnx", "genai_config.json"} <= set(fp32.files)
    f = fp32.llm_fidelity
    assert f is not None and f.n_tokens >= 256 and f.n_prompts >= 8
    assert f.top1_agreement >= 0.99 and f.greedy_identical == f.n_prompts and f.passed  # fp32 is the same model
    assert abs(f.perplexity - f.perplexity_reference) / f.perplexity_reference < 1e-3
    q = int4.quantization
    assert q["weights_bits"] == 4 and q["block_size"] == 32  # block-wise, the profile's group size
    assert int4.size_bytes < fp32.size_bytes
    for a in m.artifacts:
        kv = a.details["kv_cache_bytes_per_token"]
        assert kv == 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head_dim x fp32
        assert a.details["predicted_peak_memory_bytes"] >= a.size_bytes + kv * 512
        assert a.runtime["max_context"] == 512
        assert "onnxruntime-genai model builder" in a.details["tool"]
        assert a.details["fidelity_measured_on"]["torch_blocked"] is False  # same kernels in every process
        # the head runs on the last position only (the builder's graph ran it on every prompt position)
        assert a.runtime["logits"] == "last" and a.details["predicted_peak_memory"]["prefill_logits_bytes"] == 4 * 384
    # seconds per stage, each exclusive of the others: the builder lowers; for int4 the search's builds (the block
    # pass) count as quantize and its scores as validate, the ranking as search
    assert list(fp32.stages) == ["lower", "validate"] and set(int4.stages) == {"lower", "search", "quantize", "validate"}
    assert sum(int4.stages.values()) <= int4.export_seconds + 0.01
    assert m.llm is not None and m.llm["generation"] == {"eos_token_ids": [2], "bos_token_id": 0, "max_context": 512}
    assert (b.root / m.llm["chat_template"]).read_text().startswith("{% for message in messages %}")
    assert (b.root / "tokenizer/tokenizer.json").is_file()
    held = json.loads((b.root / m.samples["heldout"]).read_text())
    assert len(held["prompts"]) >= 8 and len(held["text_ids"]) == f.n_tokens + 1


def test_below_floor_is_kept_only_when_degraded_is_allowed(tiny_llama_bundle: Path, tiny_llama_dir: Path,
                                                          tmp_path: Path) -> None:
    int4 = load_bundle(tiny_llama_bundle).manifest.artifact("onnx/int4-weight")
    assert int4.llm_fidelity is not None
    if int4.llm_fidelity.passed:
        pytest.skip("this tiny model's int4 artifact happens to pass the floor")
    assert any(w.startswith("DEGRADED:") for w in int4.warnings)
    with pytest.raises(FidelityError, match=r"onnx/int4-weight: teacher-forced top-1 agreement .* below .*floor 0.9"):
        export_llm(tiny_llama_dir, target="x86-64-laptop", out=tmp_path / "b", formats=["onnx"],
                   recipes=["int4-weight"], max_context=512, **QUIET)
    assert not (tmp_path / "b").exists()


def test_refusing_tool_is_recorded_and_the_others_continue(tiny_qwen2_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A format whose module is missing, and one whose tool raises, are recorded; ONNX still exports (Qwen2)."""
    def refuse(req: LLMExportRequest) -> None:
        raise RuntimeError("fake-converter 1.0 cannot lower aten::fancy_op")

    monkeypatch.setitem(LLM_EXPORTER_MODULES, "nosuch", "edgeship.exporters.llm_nosuch")
    monkeypatch.setitem(LLM_EXPORTER_MODULES, "boom", "edgeship.exporters.llm_base")
    snap = LLM_EXPORTERS.snapshot()
    LLM_EXPORTERS.add("boom", refuse)  # type: ignore[arg-type]
    try:
        res = export_llm(tiny_qwen2_dir, target="x86-64-laptop", out=tmp_path / "b", formats=["nosuch", "boom", "onnx"],
                         recipes=["fp32"], max_context=256, **QUIET)
    finally:
        LLM_EXPORTERS.restore(snap)
    m = res.manifest
    assert [a.key for a in m.artifacts] == ["onnx/fp32"] and m.model["architecture"] == "Qwen2ForCausalLM"
    refused = {r["format"]: r for r in m.llm["refused"]}  # type: ignore[index]
    assert refused["nosuch"]["reason"] == "not available in this build (no module edgeship.exporters.llm_nosuch)"
    assert refused["boom"]["reason"] == "fake-converter 1.0 cannot lower aten::fancy_op"
    assert "RuntimeError" in refused["boom"]["tool"]
    assert "REFUSED" in res.summary()
    assert not any(p.name.startswith(".stage") for p in res.bundle.rglob("*"))


def test_builder_refusal_names_the_tool(tiny_gemma3_dir: Path, tmp_path: Path) -> None:
    """onnxruntime-genai 0.18's builder cannot read this transformers' Gemma 3 rope config: the error says so."""
    try:
        res = export_llm(tiny_gemma3_dir, target="x86-64-laptop", out=tmp_path / "b", formats=["onnx"],
                         recipes=["fp32"], max_context=256, **QUIET)
    except ExportError as e:
        assert "no artifact was written: onnx/fp32: onnxruntime-genai" in str(e) and "model builder refused" in str(e)
        assert not (tmp_path / "b").exists()
    else:  # a builder that handles it: then the artifact must be faithful
        fid = res.manifest.artifacts[0].llm_fidelity
        assert fid is not None and fid.top1_agreement >= 0.99


def test_memory_is_checked_before_export(tiny_llama_dir: Path, tmp_path: Path) -> None:
    target = _target(tmp_path, ram_gb=0.03, max_context=1024)
    with pytest.raises(ExportError, match=r"predicted peak memory \d+ MB \(weights .* KV cache 512 B/token x 1024 "
                                          r"tokens = 0 MB \+ prefill logits \d+ MB \+ runtime 115 MB\) exceeds test-target's 0.03 GB RAM; "
                                          r"lower --max-context or use a smaller recipe or --kv-cache int8 \(ONNX\)"):
        export_llm(tiny_llama_dir, target=str(target), out=tmp_path / "b", formats=["onnx"], recipes=["fp32"], **QUIET)
    # an int8 cache (ONNX) counts one byte per element, and the fp32 message names it as a way out
    with pytest.raises(ExportError, match=r"KV cache 128 B/token x 1024 tokens .* exceeds test-target's 0.03 GB "
                                          r"RAM; lower --max-context or use a smaller recipe$"):
        export_llm(tiny_llama_dir, target=str(target), out=tmp_path / "b", formats=["onnx"], recipes=["fp32"],
                   kv_cache="int8", **QUIET)


def test_bad_plans_fail_before_loading(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown LLM recipe 'int8-static'"):
        export_llm(tiny_llama_dir, target="pixel-8", out=tmp_path / "b", recipes=["int8-static"], **QUIET)
    with pytest.raises(ConfigError, match="unknown LLM format 'onx'. Did you mean 'onnx'"):
        export_llm(tiny_llama_dir, target="pixel-8", out=tmp_path / "b", formats=["onx"], **QUIET)
    with pytest.raises(ConfigError, match="--max-context 4096 exceeds the model's max_position_embeddings 1024"):
        export_llm(tiny_llama_dir, target="pixel-8", out=tmp_path / "b", formats=["onnx"], max_context=4096, **QUIET)


def test_corrupt_artifact_folder_is_one_line(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    from edgeship.profiling.llm.runtime import open_llm

    b = shutil.copytree(tiny_llama_bundle, tmp_path / "b")
    art = load_bundle(b).manifest.artifact("onnx/fp32")
    (b / art.path / "model.onnx").write_bytes((b / art.path / "model.onnx").read_bytes()[:2000])
    with pytest.raises(ArtifactLoadError, match="onnxruntime-genai cannot load it .* corrupt or truncated") as e:
        open_llm("onnx", b / art.path, art.runtime, threads=1)
    assert "\n" not in str(e.value)
    (b / art.path / "genai_config.json").write_text("{")
    with pytest.raises(ArtifactLoadError, match="not an ONNX GenAI folder"):
        open_llm("onnx", b / art.path, art.runtime, threads=1)


def test_exporter_modules_are_importable_or_absent() -> None:
    """Every format the core knows either registers its exporter on import or is not in this build yet."""
    import importlib

    for fmt, mod in LLM_EXPORTER_MODULES.items():
        try:
            m: ModuleType = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            assert e.name == mod
            continue
        assert m is not None and fmt in LLM_EXPORTERS


@pytest.mark.needs_export
def test_cli_export_prints_only_our_lines(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`edgeship export` of an LLM diverts the other libraries' output to a log as the encoder export does (it did
    not: a SmolLM2 export printed torchao's failed CUDA kernels, torch's pytree and dynamo warnings, ExecuTorch's
    FutureWarnings, one a 10 kB line, between our progress lines)."""
    import re
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edgeship", "export", str(tiny_llama_dir), "--target", "x86-64-laptop",
                        "-o", str(tmp_path / "b"), "--format", "pte", "--quant", "fp32", "--max-context", "64",
                        "--allow-degraded"], capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    ours = [re.compile(p) for p in (
        r"loading .*\.\.\.$", r"PyTorch fp32 reference: .*$", r"\[1/1\] pte/fp32$", r"  pte/fp32: .*$",
        r"\[pte/fp32\] (prepare|quantize|capture|lower|serialize|validate)\.\.\.$",
        r"artifact +.*$", r"-+( +-+)+$", r"pte/fp32 +\d.*$", r"bundle: .*$",
        r"other libraries' output \(\d+ lines\): (\S+\.log) \(--verbose shows it here\)$")]
    assert not [ln for ln in lines if not any(p.match(ln) for p in ours)], lines
    log = Path(next(m.group(1) for ln in lines if (m := ours[-1].match(ln))))
    assert "Warning" in log.read_text()  # the noise existed and went to the log
    # the export process holds torch (so the wheel's LLM kernels); the fidelity kept is the device's: measured in a
    # fresh process with torch blocked, on the shim's own kernels (an int4 SmolLM2 reply differs between the two)
    art = load_bundle(tmp_path / "b").manifest.artifact("pte/fp32")
    assert list(art.stages) == ["prepare", "quantize", "capture", "lower", "serialize", "validate"], art.stages
    assert sum(art.stages.values()) <= art.export_seconds + 0.01  # exclusive: no stage counted twice
    measured = art.details["fidelity_measured_on"]
    assert measured["torch_blocked"] is True and "edgeship's" in measured["executes"], measured


def test_reference_round_trips_through_its_file(tmp_path: Path) -> None:
    """The fidelity reference crosses to the runner process as one .npz (no pickles): every field comes back."""
    import numpy as np

    from edgeship.llm_fidelity import LLMReference, load_reference, save_reference

    ref = LLMReference(text_ids=(5, 6, 7), logprobs=np.log(np.full((2, 4), 0.25, dtype=np.float32)),
                       prompt_ids=((1, 2), (3,)), continuations=((9, 9), (8, 7)), new_tokens=2)
    back = load_reference(save_reference(ref, tmp_path / "ref.npz"))
    assert back.text_ids == ref.text_ids and back.prompt_ids == ref.prompt_ids
    assert back.continuations == ref.continuations and back.new_tokens == 2
    np.testing.assert_array_equal(back.logprobs, ref.logprobs)
    assert [f.name for f in tmp_path.iterdir()] == ["ref.npz"]
