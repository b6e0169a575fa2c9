"""Schema and loader for target profiles (``targets/profiles/*.toml``).

A profile is validated field by field on load; unknown keys, missing keys and
wrong types are errors that name the file and the key. The loader is torch-free:
it runs on the device too.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from edgeship.errors import ConfigError, UnknownKeyError
from edgeship.vocab import FORMATS, LLM_RECIPES, METERS, RECIPES

PROFILE_DIR = Path(__file__).with_name("profiles")
SCHEMA_VERSION = 1

KNOWN_ISA = ("neon", "fp16", "dotprod", "i8mm", "sve", "sve2", "sse4.2", "avx", "avx2", "fma", "avx512f",
             "avx512-vnni", "avx-vnni", "amx")


@dataclass(frozen=True)
class CoreCluster:
    name: str
    count: int
    max_mhz: int


@dataclass(frozen=True)
class DelegateRoute:
    """How one format reaches an accelerator: an ORT execution provider, a LiteRT
    delegate or an ExecuTorch backend. ``installable_here`` is False when its SDK
    cannot be installed on a build machine like ours (then export falls back and says so)."""

    format: str
    backend: str
    installable_here: bool = False
    note: str = ""


# Hexagon architectures the QNN HTP backend compiles for (QAIRT 2.x ``htp_arch``): v68 (888) ... v81 (8 Elite Gen 5)
KNOWN_HTP_ARCHS = (68, 69, 73, 75, 79, 81)


@dataclass(frozen=True)
class QnnTarget:
    """What the QNN HTP backend needs to compile a context binary offline for one Snapdragon NPU.

    Without ``htp_arch``/``soc_model`` the offline compile of a whole MiniLM failed with
    ``QNN_COMMON_ERROR_MEM_ALLOC``; with them it compiled (onnxruntime-qnn 2.7.0).
    ``min_flops_coverage`` is the share of estimated FLOPs that must land in HTP partitions.
    """

    backend: str  # "htp"
    htp_arch: int
    soc_model: int
    min_flops_coverage: float = 0.95


@dataclass(frozen=True)
class Accelerator:
    kind: str  # "npu" | "gpu" | "dsp"
    name: str
    routes: tuple[DelegateRoute, ...] = ()
    qnn: QnnTarget | None = None


@dataclass(frozen=True)
class PowerModel:
    idle_w: float
    active_w_per_core: float
    meter: str
    calibration_scale: float = 1.0
    calibration_offset_w: float = 0.0


@dataclass(frozen=True)
class LLMSettings:
    """How decoder LLMs are exported for and judged on this target (the ``[llm]`` table; every key optional).

    ``runtime_overhead_mb`` is what a runtime holds besides the artifact's bytes, the KV cache and one position's
    logits: Python and the runtime's libraries (~39 MB), weights the runtime repacks at load beyond the file's
    pages, arenas, a prefill chunk's attention scratch. Measured on x86-64 (2026-12-04), SmolLM2-135M in ONNX GenAI
    at context 2048, a 2000-token prompt decoded to the end: peak 359 MB = 152 MB file + 94 MB KV + 113 (int4);
    440 = 236 + 94 + 110 (int8); with an int8 cache 291 = 152 + 24 + 115 and 346 = 205 + 24 + 117. LiteRT's is
    larger (its packed-weight cache: tflite int4 373 = 115 + 94 + 164 at that context). The predicted peak memory
    at max context is weights + KV bytes/token x max_context + the last position's logits + this.
    """

    max_context: int = 2048
    int4_group_size: int = 32
    runtime_overhead_mb: float = 115.0
    min_top1_agreement: dict[str, float] = field(
        default_factory=lambda: {"default": 0.95, "int4-weight": 0.90})

    def top1_floor(self, recipe: str) -> float:
        """Teacher-forced next-token top-1 agreement with PyTorch fp32 an artifact of ``recipe`` must reach."""
        return self.min_top1_agreement.get(recipe, self.min_top1_agreement.get("default", 0.95))


@dataclass(frozen=True)
class TargetProfile:
    name: str
    display_name: str
    source: str
    arch: str
    soc: str
    clusters: tuple[CoreCluster, ...]
    isa: tuple[str, ...]
    ram_gb: float
    memory_bandwidth_gbps: float
    peak_fp32_gflops: float
    peak_int8_gops: float
    formats: tuple[str, ...]
    recipes: tuple[str, ...]
    threads: int
    sequence_length: int
    image_size: int
    power: PowerModel
    accelerators: tuple[Accelerator, ...] = ()
    int4_group_size: int = 32
    fidelity_floor: dict[str, float] = field(default_factory=dict)
    llm: LLMSettings = field(default_factory=LLMSettings)
    path: str = ""
    boards: tuple[str, ...] = ()  # device-tree model names of this board, e.g. "Raspberry Pi 5"

    def is_board(self, model: str | None) -> bool:
        """Whether a detected board model ("Raspberry Pi 5 Model B Rev 1.0") is this profile's board."""
        if not model:
            return False
        return any(re.match(rf"{re.escape(b)}(?![\w])", model, flags=re.IGNORECASE) for b in self.boards)

    @property
    def cores(self) -> int:
        return sum(c.count for c in self.clusters)

    def min_mean_cosine(self, recipe: str) -> float:
        """The fidelity floor for an artifact of this recipe (mean cosine vs PyTorch)."""
        return self.fidelity_floor.get(recipe, self.fidelity_floor.get("default", 0.99))

    @property
    def qnn(self) -> QnnTarget | None:
        """The Snapdragon NPU this profile compiles QNN context binaries for, if it has one."""
        return next((a.qnn for a in self.accelerators if a.qnn is not None), None)

    def preferred_backends(self, fmt: str) -> list[DelegateRoute]:
        return [r for a in self.accelerators for r in a.routes if r.format == fmt]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _take(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise ConfigError(f"{where}: missing key '{key}'")
        return default
    v = d.pop(key)
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, float)):
        tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ConfigError(f"{where}: key '{key}' must be {tname}, got {type(v).__name__} {v!r}")
    return v


def _table(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: must be a table ({{ key = value, ... }}), got {type(v).__name__} {v!r}")
    return dict(v)


def _no_extra(d: dict[str, Any], where: str) -> None:
    if d:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(d))}")


def _check_members(values: list[str], valid: tuple[str, ...], what: str, where: str) -> tuple[str, ...]:
    for v in values:
        if v not in valid:
            raise ConfigError(f"{where}: unknown {what} '{v}' (valid: {', '.join(valid)})")
    return tuple(values)


def _parse_qnn(q: dict[str, Any], where: str) -> QnnTarget:
    backend = _take(q, "backend", str, where)
    if backend != "htp":
        raise ConfigError(f"{where}: backend must be 'htp' (the Hexagon NPU), got {backend!r}")
    arch = _take(q, "htp_arch", int, where)
    if arch not in KNOWN_HTP_ARCHS:
        raise ConfigError(f"{where}: htp_arch {arch} is not a Hexagon HTP version (valid: "
                          f"{', '.join(map(str, KNOWN_HTP_ARCHS))})")
    soc = _take(q, "soc_model", int, where)
    if soc < 1:
        raise ConfigError(f"{where}: soc_model must be QNN's positive SoC id (57 = Snapdragon 8 Gen 3), got {soc}")
    cov = _take(q, "min_flops_coverage", float, where, 0.95)
    if not 0.0 <= cov <= 1.0:
        raise ConfigError(f"{where}: min_flops_coverage must be in [0, 1], got {cov}")
    _no_extra(q, where)
    return QnnTarget(backend, arch, soc, cov)


def parse_profile(data: dict[str, Any], where: str) -> TargetProfile:
    d = dict(data)
    version = _take(d, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        raise ConfigError(f"{where}: schema_version {version} is not supported (this edgeship reads {SCHEMA_VERSION})")
    name = _take(d, "name", str, where)
    display = _take(d, "display_name", str, where)
    source = _take(d, "source", str, where)
    boards = tuple(str(b) for b in _take(d, "boards", list, where, []))

    cpu = dict(_take(d, "cpu", dict, where))
    w = f"{where} [cpu]"
    arch = _take(cpu, "arch", str, w)
    if arch not in ("aarch64", "x86_64", "armv7l"):
        raise ConfigError(f"{w}: arch must be aarch64, x86_64 or armv7l, got {arch!r}")
    soc = _take(cpu, "soc", str, w)
    clusters = []
    for i, c in enumerate(_take(cpu, "clusters", list, w)):
        wc = f"{w} clusters[{i}]"
        c = _table(c, wc)
        clusters.append(CoreCluster(_take(c, "name", str, wc), _take(c, "count", int, wc), _take(c, "max_mhz", int, wc)))
        _no_extra(c, wc)
    if not clusters:
        raise ConfigError(f"{w}: at least one core cluster is required")
    isa = _check_members(_take(cpu, "isa", list, w), KNOWN_ISA, "ISA feature", w)
    _no_extra(cpu, w)

    mem = dict(_take(d, "memory", dict, where))
    w = f"{where} [memory]"
    ram = _take(mem, "ram_gb", float, w)
    bw = _take(mem, "bandwidth_gbps", float, w)
    _no_extra(mem, w)

    comp = dict(_take(d, "compute", dict, where))
    w = f"{where} [compute]"
    fp32 = _take(comp, "peak_fp32_gflops", float, w)
    int8 = _take(comp, "peak_int8_gops", float, w)
    _no_extra(comp, w)

    accs = []
    for i, a in enumerate(_take(d, "accelerators", list, where, [])):
        wa = f"{where} accelerators[{i}]"
        a = _table(a, wa)
        routes = []
        for j, r in enumerate(_take(a, "routes", list, wa, [])):
            wr = f"{wa} routes[{j}]"
            r = _table(r, wr)
            fmt = _take(r, "format", str, wr)
            _check_members([fmt], tuple(FORMATS), "format", wr)
            routes.append(DelegateRoute(fmt, _take(r, "backend", str, wr), _take(r, "installable_here", bool, wr, False),
                                        _take(r, "note", str, wr, "")))
            _no_extra(r, wr)
        kind = _take(a, "kind", str, wa)
        if kind not in ("npu", "gpu", "dsp"):
            raise ConfigError(f"{wa}: kind must be npu, gpu or dsp, got {kind!r}")
        qnn_raw = _take(a, "qnn", dict, wa, None)
        qnn = _parse_qnn(dict(qnn_raw), f"{wa} qnn") if qnn_raw is not None else None
        accs.append(Accelerator(kind, _take(a, "name", str, wa), tuple(routes), qnn))
        _no_extra(a, wa)

    exp = dict(_take(d, "export", dict, where))
    w = f"{where} [export]"
    formats = _check_members(_take(exp, "formats", list, w), tuple(FORMATS), "format", w)
    recipes = _check_members(_take(exp, "recipes", list, w), RECIPES, "recipe", w)
    if not formats or not recipes:
        raise ConfigError(f"{w}: formats and recipes must not be empty")
    group = _take(exp, "int4_group_size", int, w, 32)
    floor_raw = dict(_take(exp, "min_mean_cosine", dict, w, {"default": 0.99}))
    floor: dict[str, float] = {}
    for k, v in floor_raw.items():
        if k != "default":
            _check_members([k], RECIPES, "recipe", f"{w} min_mean_cosine")
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"{w}: min_mean_cosine.{k} must be a number in [0, 1], got {v!r}")
        floor[k] = float(v)
    _no_extra(exp, w)

    run = dict(_take(d, "runtime", dict, where))
    w = f"{where} [runtime]"
    threads = _take(run, "threads", int, w)
    seq = _take(run, "sequence_length", int, w)
    img = _take(run, "image_size", int, w)
    _no_extra(run, w)

    pw = dict(_take(d, "power", dict, where))
    w = f"{where} [power]"
    meter = _take(pw, "meter", str, w)
    _check_members([meter], METERS, "meter", w)
    power = PowerModel(_take(pw, "idle_w", float, w), _take(pw, "active_w_per_core", float, w), meter,
                       _take(pw, "calibration_scale", float, w, 1.0), _take(pw, "calibration_offset_w", float, w, 0.0))
    _no_extra(pw, w)
    llm = _parse_llm(dict(_take(d, "llm", dict, where, {})), f"{where} [llm]")
    _no_extra(d, where)

    total = sum(c.count for c in clusters)
    if not 1 <= threads <= total:
        raise ConfigError(f"{where}: runtime.threads={threads} must be between 1 and the core count {total}")
    return TargetProfile(
        name=name, display_name=display, source=source, arch=arch, soc=soc, clusters=tuple(clusters), isa=isa,
        ram_gb=ram, memory_bandwidth_gbps=bw, peak_fp32_gflops=fp32, peak_int8_gops=int8, formats=formats,
        recipes=recipes, threads=threads, sequence_length=seq, image_size=img, power=power,
        accelerators=tuple(accs), int4_group_size=group, fidelity_floor=floor, path=where, boards=boards, llm=llm,
    )


def _parse_llm(d: dict[str, Any], where: str) -> LLMSettings:
    base = LLMSettings()
    ctx = _take(d, "max_context", int, where, base.max_context)
    group = _take(d, "int4_group_size", int, where, base.int4_group_size)
    overhead = _take(d, "runtime_overhead_mb", float, where, base.runtime_overhead_mb)
    floors = dict(base.min_top1_agreement)
    for k, v in dict(_take(d, "min_top1_agreement", dict, where, {})).items():
        if k != "default":
            _check_members([k], LLM_RECIPES, "LLM recipe", f"{where} min_top1_agreement")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"{where}: min_top1_agreement.{k} must be a number in [0, 1], got {v!r}")
        floors[k] = float(v)
    _no_extra(d, where)
    if ctx < 16:
        raise ConfigError(f"{where}: max_context must be >= 16, got {ctx}")
    if group < 16 or group & (group - 1):
        raise ConfigError(f"{where}: int4_group_size must be a power of two >= 16, got {group}")
    if overhead < 0:
        raise ConfigError(f"{where}: runtime_overhead_mb must be >= 0, got {overhead}")
    return LLMSettings(max_context=ctx, int4_group_size=group, runtime_overhead_mb=overhead, min_top1_agreement=floors)


def load_profile_file(path: str | Path) -> TargetProfile:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"target profile file not found: {p}") from None
    except OSError as e:
        raise ConfigError(f"target profile {p}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text; a target profile is a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    prof = parse_profile(data, str(p))
    if p.parent == PROFILE_DIR and prof.name != p.stem:
        raise ConfigError(f"{p}: name '{prof.name}' must match the file name '{p.stem}'")
    return prof


@cache
def _builtin() -> dict[str, TargetProfile]:
    return {p.stem: load_profile_file(p) for p in sorted(PROFILE_DIR.glob("*.toml"))}


def list_profiles() -> list[TargetProfile]:
    return list(_builtin().values())


def get_profile(name_or_path: str) -> TargetProfile:
    """A built-in profile by name, or a profile file by path (ends with .toml)."""
    if name_or_path.endswith(".toml"):
        return load_profile_file(name_or_path)
    profiles = _builtin()
    if name_or_path not in profiles:
        raise UnknownKeyError("target", name_or_path, profiles)
    return profiles[name_or_path]
