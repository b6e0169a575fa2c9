"""What ``edgeship profile`` measures for an LLM bundle: typed, frozen, JSON round-trippable. Torch-free."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeship.errors import ConfigError
from edgeship.profiling.energy import EnergyResult
from edgeship.profiling.resident import Resident
from edgeship.profiling.results import DeviceInfo, known_fields
from edgeship.profiling.stats import LatencyStats

LLM_RESULT_SCHEMA_VERSION = 1
_REMOTE_KEYS = ("device_url", "device_identity", "status", "error", "timings_s")


@dataclass(frozen=True)
class LLMRunConfig:
    prompt_lengths: tuple[int, ...] = (64, 256)
    new_tokens: int = 128
    threads: int | None = None
    energy: str = "auto"
    idle_seconds: float = 1.0
    sample_hz: float = 10.0
    energy_csv: str | None = None
    power_target: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_lengths or any(n < 1 for n in self.prompt_lengths):
            raise ConfigError(f"--prompt-lengths must be positive integers, got {list(self.prompt_lengths)}")
        if self.new_tokens < 10:
            raise ConfigError(f"--new-tokens must be >= 10 (decode throughput compares the first and last 10%), "
                              f"got {self.new_tokens}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prompt_lengths"] = list(self.prompt_lengths)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LLMRunConfig:
        lengths = tuple(int(n) for n in d.get("prompt_lengths", cls.prompt_lengths))
        return cls(**{**known_fields(cls, d, "LLM run config"), "prompt_lengths": lengths})


@dataclass(frozen=True)
class PromptTiming:
    """Prefill of one prompt length from an empty cache: time to the first token's logits."""

    prompt_tokens: int
    ttft_ms: float
    prefill_tokens_per_s: float


@dataclass(frozen=True)
class LLMArtifactResult:
    artifact: str
    format: str
    recipe: str
    status: str  # "ok" | "error"
    error: str | None = None
    torch_free: bool = False
    threads: int | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    load_seconds: float | None = None
    prompts: tuple[PromptTiming, ...] = ()
    decode_tokens: int = 0
    decode_tokens_per_s: float | None = None  # steady state: every greedy step after the first token
    decode_token_ms: LatencyStats | None = None  # of the per-token times
    decode_retained: float | None = None  # tok/s over the last 10% of tokens / over the first 10%
    token_ns: tuple[int, ...] = ()  # raw per-token decode times
    rss_after_load_mb: float | None = None
    peak_rss_mb: float | None = None  # includes the KV cache at the longest context reached
    resident_at_end: Resident | None = None  # what the memory was made of after the decode, model still loaded
    max_context: int | None = None
    kv_cache_bytes_per_token: int | None = None
    predicted_peak_memory_mb: float | None = None
    energy: EnergyResult | None = None  # of the decode window; ``estimated`` labels an estimate
    joules_per_token: float | None = None
    warnings: tuple[str, ...] = ()

    @property
    def energy_estimated(self) -> bool:
        return self.energy is not None and self.energy.estimated

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prompts"] = [dataclasses.asdict(p) for p in self.prompts]
        d["token_ns"] = list(self.token_ns)
        d["warnings"] = list(self.warnings)
        d["decode_token_ms"] = self.decode_token_ms.to_dict() if self.decode_token_ms else {}  # {}: not measured
        d["energy"] = self.energy.to_dict() if self.energy else {}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LLMArtifactResult:
        d = dict(d)
        d["prompts"] = tuple(PromptTiming(**p) for p in d.get("prompts", ()))
        d["token_ns"] = tuple(d.get("token_ns", ()))
        d["warnings"] = tuple(d.get("warnings", ()))
        split, stats, en = d.get("resident_at_end"), d.get("decode_token_ms"), d.get("energy")
        d["resident_at_end"] = Resident.from_dict(split) if isinstance(split, Mapping) else None
        d["decode_token_ms"] = LatencyStats(**stats) if stats else None
        d["energy"] = EnergyResult.from_dict(en) if en else None
        return cls(**d)


@dataclass(frozen=True)
class LLMProfileResult:
    device: DeviceInfo
    config: LLMRunConfig
    results: tuple[LLMArtifactResult, ...]
    source: str
    target: str | None
    created_utc: str
    edgeship_version: str
    kind: str = "llm"
    schema_version: int = LLM_RESULT_SCHEMA_VERSION
    # A remote run (edgeship profile --device), as encoder DeviceRuns have them: which device, how the run went
    # (a device lost mid-run keeps what it measured before), the stages' seconds. Left out of local documents.
    device_url: str | None = None
    device_identity: Mapping[str, Any] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    timings_s: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and all(r.status == "ok" for r in self.results)

    @property
    def device_name(self) -> str:
        """The inventory name or URL of a remote device; for a local run the machine's hostname."""
        return str(self.device_identity.get("name") or self.device_url or self.device.hostname or "local")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        d["device"], d["config"] = self.device.to_dict(), self.config.to_dict()
        if self.device_url is None:
            for k in _REMOTE_KEYS:
                del d[k]
        else:
            d["device_identity"], d["timings_s"] = dict(self.device_identity), dict(self.timings_s)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LLMProfileResult:
        if d.get("schema_version") != LLM_RESULT_SCHEMA_VERSION or d.get("kind") != "llm":
            raise ConfigError(f"not an LLM results document (kind {d.get('kind')!r}, schema_version "
                              f"{d.get('schema_version')!r}; expected 'llm', {LLM_RESULT_SCHEMA_VERSION})")
        return cls(device=DeviceInfo.from_dict(d["device"]), config=LLMRunConfig.from_dict(d["config"]),
                   results=tuple(LLMArtifactResult.from_dict(r) for r in d["results"]), source=str(d["source"]),
                   target=d.get("target"), created_utc=str(d["created_utc"]), edgeship_version=str(d["edgeship_version"]),
                   device_url=d.get("device_url"), device_identity=dict(d.get("device_identity") or {}),
                   status=str(d.get("status") or "ok"), error=d.get("error"), timings_s=dict(d.get("timings_s") or {}))


def fleet_to_dict(runs: Sequence[LLMProfileResult]) -> dict[str, Any]:
    """Several devices' LLM profiles in one document (``edgeship profile --inventory`` of an LLM bundle)."""
    return {"kind": "llm", "schema_version": LLM_RESULT_SCHEMA_VERSION, "runs": [r.to_dict() for r in runs]}


def llm_documents(d: Mapping[str, Any]) -> list[LLMProfileResult]:
    """The profiles in an LLM results document: one device's, or each of a fleet's ``runs``."""
    if isinstance(d.get("runs"), list):
        if d.get("kind") != "llm" or d.get("schema_version") != LLM_RESULT_SCHEMA_VERSION:
            raise ConfigError(f"not an LLM fleet results document (kind {d.get('kind')!r}, schema_version "
                              f"{d.get('schema_version')!r})")
        return [LLMProfileResult.from_dict(r) for r in d["runs"]]
    return [LLMProfileResult.from_dict(d)]


def render(res: LLMProfileResult) -> str:
    """The terminal table: one row per artifact."""
    from edgeship.profiling.report import resident_parts, table

    rows = []
    for r in res.results:
        if r.status != "ok":
            rows.append([r.artifact, "ERROR", r.error or "", "", "", "", "", "", ""])
            continue
        ttft = ", ".join(f"{p.ttft_ms:.0f}@{p.prompt_tokens}" for p in r.prompts)
        prefill = ", ".join(f"{p.prefill_tokens_per_s:.0f}" for p in r.prompts)
        j = f"{r.joules_per_token * 1e3:.1f}{' (est.)' if r.energy_estimated else ''}" if r.joules_per_token else "-"
        rows.append([r.artifact, f"{r.load_seconds:.2f}", ttft, prefill, f"{r.decode_tokens_per_s:.1f}",
                     f"{r.decode_retained:.2f}" if r.decode_retained else "-", f"{r.peak_rss_mb:.0f}", j,
                     "yes" if r.torch_free else "no"])
    out = table(rows, ["artifact", "load s", "TTFT ms@tokens", "prefill tok/s", "decode tok/s", "retained",
                       "peak RSS MB", "mJ/token", "torch-free"])
    split = [f"  {r.artifact}: at the end "
             + resident_parts(s, "its own (weights as the runtime keeps them, KV cache, arenas)", "the artifact")
             for r in res.results if (s := r.resident_at_end) is not None]
    return "\n".join([out, *split])
