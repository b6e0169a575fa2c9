"""The bundle manifest: typed, versioned, JSON round-trippable. Torch-free (the device reads it)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.errors import BundleError, ChecksumError, SchemaVersionError
from edgeship.spec import TensorSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib  # here, not at import: OpenSSL's libcrypto is 3.5 MB of a device worker's RSS, which never hashes

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Fidelity:
    """How close an artifact's outputs are to the PyTorch model's, on held-out inputs."""

    output: str
    n_samples: int
    max_abs_err: float
    mean_abs_err: float
    mean_cosine: float
    min_cosine: float
    top1_agreement: float | None
    floor_mean_cosine: float
    passed: bool
    p5_cosine: float | None = None  # 5th percentile of the per-sample cosines (manifests before it: absent)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["p5_cosine"] is None:  # a document from before the field writes back unchanged
            del d["p5_cosine"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fidelity:
        return cls(**d)


def _check_fields(d: dict[str, Any], types: dict[str, type]) -> None:
    """Types of the fields a reader trusts (paths, digests, sizes): a wrong type is a malformed manifest, not a
    TypeError three calls later."""
    for name, typ in types.items():
        v = d.get(name)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ValueError(f"field '{name}' must be {typ.__name__}, got {type(v).__name__}")


def _check_inside(path: str, what: str) -> None:
    """A path the manifest names must stay inside the bundle: a manifest is outside input too."""
    if path.startswith(("/", "\\")) or ".." in path.replace("\\", "/").split("/") or "\x00" in path or not path:
        raise ValueError(f"{what} {path!r} must be relative and inside the bundle")


@dataclass(frozen=True)
class LLMFidelity:
    """How closely a decoder-LLM artifact follows PyTorch fp32, measured through the device runtime.

    Teacher-forced: both models read the same held-out text; per position we compare the next-token
    distributions (top-1 agreement, KL(PyTorch || artifact)) and each one's perplexity on the text.
    Greedy: each prompt is continued by both; ``first_divergence[i]`` is the index of the first generated
    token that differs (None: identical over ``new_tokens``).
    """

    n_tokens: int
    top1_agreement: float
    mean_kl: float
    perplexity: float
    perplexity_reference: float
    n_prompts: int
    new_tokens: int
    greedy_identical: int
    first_divergence: tuple[int | None, ...]
    floor_top1_agreement: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["first_divergence"] = list(self.first_divergence)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLMFidelity:
        return cls(**{**d, "first_divergence": tuple(d["first_divergence"])})


def checksum_tree(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` (a multi-file artifact), keyed by POSIX relative path."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file()}


def tree_digest(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 standing for a multi-file artifact: over the sorted "path sha256" lines of its files."""
    import hashlib

    return hashlib.sha256("".join(f"{k} {v['sha256']}\n" for k, v in sorted(files.items())).encode()).hexdigest()


@dataclass(frozen=True)
class ArtifactRecord:
    path: str
    format: str
    recipe: str
    sha256: str
    size_bytes: int
    export_seconds: float
    fidelity: Fidelity | None
    runtime: dict[str, Any]
    stages: dict[str, float] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # exporter-specific: delegation, signatures, fallbacks
    warnings: tuple[str, ...] = ()
    # A multi-file artifact (an ONNX GenAI folder): ``path`` is a directory, ``files`` maps each file under it to
    # its sha256 and size, ``sha256`` is :func:`tree_digest` of them and ``size_bytes`` their sum. Empty for one file.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    llm_fidelity: LLMFidelity | None = None

    @property
    def key(self) -> str:
        return f"{self.format}/{self.recipe}"

    @property
    def kept_layers(self) -> list[str]:
        """Layers the recipe kept in higher precision (float, or 8-bit weights in int4 recipes)."""
        return [*self.quantization.get("kept_in_float", []), *self.quantization.get("kept_in_int8", [])]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["warnings"] = list(self.warnings)
        d["llm_fidelity"] = self.llm_fidelity.to_dict() if self.llm_fidelity else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArtifactRecord:
        d = dict(d)
        _check_fields(d, {"path": str, "format": str, "recipe": str, "sha256": str, "size_bytes": int,
                          "runtime": dict})
        _check_inside(d["path"], "artifact path")
        fid = d.pop("fidelity", None)
        llm_fid = d.pop("llm_fidelity", None)
        d["warnings"] = tuple(d.get("warnings", ()))
        return cls(fidelity=Fidelity.from_dict(fid) if fid else None,
                   llm_fidelity=LLMFidelity.from_dict(llm_fid) if llm_fid else None, **d)


@dataclass(frozen=True)
class Manifest:
    model: dict[str, Any]  # name, task, source, source_sha256, parameters
    target: dict[str, Any]  # name, display_name, arch, threads
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, Any]  # dynamic dimension -> {"default": n, "min": a, "max": b}
    preprocessing: dict[str, Any]
    artifacts: tuple[ArtifactRecord, ...]
    samples: dict[str, str]
    labels: tuple[str, ...] | None
    edgeship_version: str
    created_utc: str
    schema_version: int = SCHEMA_VERSION
    # Decoder LLM bundles only: tokenizer and chat template files, generation config (EOS ids, max context),
    # held-out text and prompts. None for every other task (and absent from their JSON).
    llm: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        extra = {"llm": self.llm} if self.llm is not None else {}
        return {
            "schema_version": self.schema_version,
            "edgeship_version": self.edgeship_version,
            "created_utc": self.created_utc,
            "model": self.model,
            "target": self.target,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "dims": self.dims,
            "preprocessing": self.preprocessing,
            "labels": list(self.labels) if self.labels is not None else None,
            "samples": self.samples,
            "artifacts": [a.to_dict() for a in self.artifacts],
            **extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{where}: schema_version {version!r}, this edgeship reads {SCHEMA_VERSION}; "
                "re-export the bundle or install the edgeship version that wrote it"
                f" ({d.get('edgeship_version', 'unknown')})"
            )
        try:
            for key in ("inputs", "outputs"):
                if key in d["samples"]:
                    _check_inside(d["samples"][key], f"samples.{key}")
            return cls(
                schema_version=version,
                edgeship_version=str(d["edgeship_version"]),
                created_utc=str(d["created_utc"]),
                model=dict(d["model"]),
                target=dict(d["target"]),
                inputs=tuple(TensorSpec.from_dict(x) for x in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(x) for x in d["outputs"]),
                dims=dict(d["dims"]),
                preprocessing=dict(d["preprocessing"]),
                labels=tuple(d["labels"]) if d.get("labels") is not None else None,
                samples=dict(d["samples"]),
                artifacts=tuple(ArtifactRecord.from_dict(a) for a in d["artifacts"]),
                llm=dict(d["llm"]) if d.get("llm") is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e}); re-export the bundle") from None

    def default_dims(self) -> dict[str, int]:
        return {k: int(v["default"]) for k, v in self.dims.items()}

    def artifact(self, selector: str) -> ArtifactRecord:
        """Select by path, ``format/recipe``, or a format with a single artifact."""
        for a in self.artifacts:
            if selector in (a.path, a.key, Path(a.path).name):
                return a
        same_fmt = [a for a in self.artifacts if a.format == selector]
        if len(same_fmt) == 1:
            return same_fmt[0]
        from edgeship.errors import UnknownKeyError

        raise UnknownKeyError("artifact", selector, [a.key for a in self.artifacts])


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path_of(self, art: ArtifactRecord) -> Path:
        return self.root / art.path

    def verify(self) -> None:
        """Every artifact exists with its recorded size and sha256; raises on the first that does not."""
        root = self.root.resolve()
        for a in self.manifest.artifacts:
            if a.files:
                self._verify_tree(a)
                continue
            p = self.path_of(a)
            if not p.resolve().is_relative_to(root):  # a symlink in the bundle pointing elsewhere
                raise ChecksumError(f"bundle {self.root}: artifact {a.path} resolves outside the bundle; "
                                    "bundles hold plain files only")
            if not p.is_file():
                raise ChecksumError(f"bundle {self.root}: artifact {a.path} is missing; re-export the bundle")
            size = p.stat().st_size
            if size != a.size_bytes:
                raise ChecksumError(f"bundle {self.root}: artifact {a.path} is {size} bytes, the manifest says "
                                    f"{a.size_bytes}: the file was truncated or replaced; re-export or re-copy it")
            digest = sha256_file(p)
            if digest != a.sha256:
                raise ChecksumError(f"bundle {self.root}: artifact {a.path} fails its checksum (sha256 {digest[:12]}..., "
                                    f"manifest {a.sha256[:12]}...): the file was modified; re-export or re-copy it")


    def _verify_tree(self, a: ArtifactRecord) -> None:
        base = self.path_of(a)
        for rel, meta in a.files.items():
            p = base / rel
            where = f"bundle {self.root}: artifact {a.path}: file {rel}"
            if not p.is_file():
                raise ChecksumError(f"{where} is missing; re-export the bundle")
            if p.stat().st_size != meta["size_bytes"]:
                raise ChecksumError(f"{where} is {p.stat().st_size} bytes, the manifest says {meta['size_bytes']}: "
                                    "it was truncated or replaced; re-export or re-copy it")
            if sha256_file(p) != meta["sha256"]:
                raise ChecksumError(f"{where} fails its checksum: the file was modified; re-export or re-copy it")
        if tree_digest(a.files) != a.sha256:
            raise ChecksumError(f"bundle {self.root}: artifact {a.path}: its file list does not match its sha256; "
                                "re-export the bundle")


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if root.suffix == ".zip" and root.is_file():
        raise BundleError(f"{root} is a packed bundle: read it with `with edgeship.bundle.opened(path) as root:` "
                          "(the CLI's profile, inspect, chat, predict and verify take .zip files as they are)")
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    if not mpath.is_file():
        raise BundleError(f"{root} is not an edgeship bundle (no {MANIFEST_NAME}); an interrupted export leaves none")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}); re-export the bundle") from None
    if not isinstance(data, dict):
        raise BundleError(f"{mpath}: expected a JSON object")
    bundle = Bundle(root, Manifest.from_dict(data, str(mpath)))
    if verify:
        bundle.verify()
    return bundle
