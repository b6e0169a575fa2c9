"""What the device side measures, as frozen dataclasses with a JSON form.

``edgeship profile --json`` writes a :class:`ProfileResult`; a fleet run writes a :class:`FleetResult`
whose runs are :class:`DeviceRun` s. Every artifact's measurements are one :class:`ArtifactResult`,
serialised flat (``latency``, ``energy``, ``peak_rss_mb``, ``input_shapes``...): the JSON shape of
schema version 1 is the one edgeship has always written, so older files read unchanged. Keys a file
lacks read as ``None`` (a failed artifact has no latency). Adding a measurement block (an LLM's
tokens/s, say) is one optional field on :class:`ArtifactResult` plus one entry in ``_BLOCKS``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from edgeship.errors import ConfigError
from edgeship.manifest import Fidelity
from edgeship.profiling.energy import EnergyResult
from edgeship.profiling.resident import Resident
from edgeship.profiling.stats import LatencyStats

RESULT_SCHEMA_VERSION = 1

Shapes = Mapping[str, tuple[int, ...]]
MAX_SOAK = 10_000_000  # a day at 10 ms per inference; more is a typo, not a soak


def _shapes(d: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(x) for x in v) for k, v in (d or {}).items()}


def _lists(s: Shapes) -> dict[str, list[int]]:
    return {k: list(v) for k, v in s.items()}


def _build(cls: Any, d: Mapping[str, Any], **fixed: Any) -> Any:
    """``cls`` from the keys of ``d`` it has fields for (a file may lack optional ones, or hold more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in d.items() if k in names}, **fixed})


def known_fields(cls: Any, d: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``d`` as keyword arguments of ``cls``; a key it has no field for is refused (a newer edgeship wrote it?)."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(unknown)} (written by a newer edgeship?)")
    return dict(d)


def _plain(v: Any) -> Any:
    return dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class RunConfig:
    """How to measure: ``edgeship profile``'s options."""

    runs: int = 50
    min_seconds: float = 2.0
    max_seconds: float = 300.0
    warmup: int = 5
    threads: int | None = None
    shapes: Shapes = field(default_factory=dict)
    energy: str = "auto"
    idle_seconds: float = 1.0
    sample_hz: float = 10.0
    cooldown_to_c: float | None = None
    energy_csv: str | None = None
    power_target: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    per_op: bool = False
    progress: bool = True
    seed: int = 0
    simulate_npu: bool = False  # without a Hexagon NPU, run compiled QNN context models on the HTP simulator
    method: str | None = None  # the method of a .pte to run (default: forward, or its only method)
    cpus: tuple[int, ...] = ()  # pin the worker to these CPUs (sched_setaffinity); () = wherever the OS puts it
    core_set: str | None = None  # the name of that CPU set in a sweep: "big", "little", "all"
    repeat: int = 1  # fresh worker processes per artifact, interleaved across artifacts (rounds)
    soak: int | None = None  # --soak N: after the timed loop, N more inferences with RSS sampled along the way
    inputs: str | None = None  # --inputs FILE: the user's texts / arrays / image folder, timed round-robin

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ConfigError(f"--runs must be >= 1, got {self.runs}")
        if not 1 <= self.repeat <= 100:
            raise ConfigError(f"--repeat must be between 1 and 100 (fresh processes per artifact), got {self.repeat}")
        if self.soak is not None and not 1 <= self.soak <= MAX_SOAK:
            raise ConfigError(f"--soak must be between 1 and {MAX_SOAK:,} inferences per artifact, got {self.soak}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.min_seconds < 0 or self.max_seconds <= 0 or self.max_seconds < self.min_seconds:
            raise ConfigError(f"--min-seconds {self.min_seconds} / --max-seconds {self.max_seconds}: need "
                              "0 <= min <= max and max > 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.idle_seconds < 0 or not self.sample_hz > 0:
            raise ConfigError(f"--idle-seconds {self.idle_seconds} / --sample-hz {self.sample_hz}: need idle >= 0 "
                              "and a sampling rate > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shapes"] = _lists(self.shapes)
        d["options"] = dict(self.options)
        d["cpus"] = list(self.cpus)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        return cls(**{**known_fields(cls, d, "run config"), "shapes": _shapes(d.get("shapes")),
                      "options": dict(d.get("options") or {}), "cpus": tuple(d.get("cpus") or ())})


@dataclass(frozen=True)
class DeviceInfo:
    """The machine a measurement was taken on (:func:`edgeship.profiling.sysinfo.describe`)."""

    hostname: str | None = None
    arch: str | None = None
    cpu_model: str | None = None
    board: str | None = None
    logical_cpus: int | None = None
    cpu_freq_mhz: Mapping[str, float] | None = None
    os: str | None = None
    python: str | None = None
    python_executable: str | None = None
    runtimes: Mapping[str, str] = field(default_factory=dict)
    emulated: str | None = None  # "qemu-user" when the timings are an emulator's, not the device's

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceInfo:
        return _build(cls, d, runtimes=dict(d.get("runtimes") or {}))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class InputInfo:
    """What the latency was measured on."""

    source: str | None  # "bundle held-out sample 0" or "synthesized (seed 0)"
    shapes: Shapes
    dtypes: Mapping[str, str]
    real_tokens: int | None = None  # non-padding tokens, for text models (ONNX graphs drop trailing padding)

    def describe(self) -> str:
        """'bundle held-out sample 0: input_ids 1x128 (17 real tokens)'."""
        if not self.shapes:
            return ""
        desc = ", ".join(f"{k} {'x'.join(str(d) for d in v)}" for k, v in self.shapes.items())
        if self.real_tokens is not None:
            desc += f" ({self.real_tokens} real tokens)"
        return f"{self.source}: {desc}" if self.source else desc


@dataclass(frozen=True)
class Memory:
    """Resident set size in MB: before and after loading the model, and the worker's peak; ``resident_at_end``
    what the resident memory was made of at the end of the run, the model still loaded (:mod:`.resident`)."""

    rss_before_load_mb: float
    rss_after_load_mb: float
    peak_rss_mb: float
    resident_at_end: Resident | None = None


@dataclass(frozen=True)
class Agreement:
    """The artifact re-run on the bundle's held-out samples on the device, against PyTorch's outputs."""

    output: str
    n_samples: int
    max_abs_err: float
    mean_abs_err: float
    mean_cosine: float
    min_cosine: float
    top1_agreement: float | None


@dataclass(frozen=True)
class TelemetrySummary:
    """Thermal and frequency telemetry of the run; the sensor readings stay as the sensors gave them."""

    throttled: bool
    throttle_reasons: tuple[str, ...] = ()
    readings: Mapping[str, Any] = field(default_factory=dict)  # samples, cpufreq, temperature, pi_throttled...

    def to_dict(self) -> dict[str, Any]:
        return {**self.readings, "throttled": self.throttled, "throttle_reasons": list(self.throttle_reasons)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TelemetrySummary:
        rest = {k: v for k, v in d.items() if k not in ("throttled", "throttle_reasons")}
        return cls(bool(d.get("throttled")), tuple(d.get("throttle_reasons") or ()), rest)


@dataclass(frozen=True)
class Soak:
    """RSS over a long run (--soak N): ``rss_mb[i]`` was read after ``at_inference[i]`` inferences, ``seconds[i]``
    into the soak. ``growth_mb_per_1k`` is the RSS growth after warm-up per 1,000 inferences (``method`` says how);
    None when there are too few samples to fit."""

    inferences: int
    at_inference: tuple[int, ...]
    seconds: tuple[float, ...]
    rss_mb: tuple[float, ...]
    growth_mb_per_1k: float | None
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Soak:
        return cls(int(d.get("inferences") or 0), tuple(int(x) for x in d.get("at_inference") or ()),
                   tuple(float(x) for x in d.get("seconds") or ()), tuple(float(x) for x in d.get("rss_mb") or ()),
                   None if d.get("growth_mb_per_1k") is None else float(d["growth_mb_per_1k"]), str(d.get("method", "")))

    def describe(self) -> str:
        """'10000 inferences in 31.2 s: RSS 61.2 -> 61.3 MB, +0.004 MB per 1,000 after warm-up (least-squares ...)'."""
        text = f"soak {self.inferences} inferences"
        if self.seconds:
            text += f" in {self.seconds[-1]:.1f} s"
        if self.rss_mb:
            text += f": RSS {self.rss_mb[0]:.1f} -> {self.rss_mb[-1]:.1f} MB (max {max(self.rss_mb):.1f})"
        if self.growth_mb_per_1k is None:
            return f"{text}, growth n/a ({self.method})"
        return f"{text}, {self.growth_mb_per_1k:+.3f} MB per 1,000 after warm-up ({self.method})"


@dataclass(frozen=True)
class LengthBucket:
    """Latency of the timed runs whose input fell in one length bucket (``lo``-``hi`` real tokens; None: all)."""

    label: str  # "17-32 tokens" or "all inputs"
    lo: int | None
    hi: int | None
    inputs: int  # distinct inputs in the bucket
    runs: int  # timed runs on them
    p50_ms: float
    p90_ms: float


@dataclass(frozen=True)
class UserInputsRun:
    """--inputs FILE: which inputs were timed (round-robin: timed run ``i`` ran input ``i % count``), the latency by
    input length, and how this artifact's outputs on them agree with the run's reference artifact.

    There is no PyTorch on the device and no reference output for the user's inputs: ``agreement`` compares with
    another artifact of the same run (``agreement_vs``, an fp32 one), never with PyTorch. The check against
    PyTorch is ``ArtifactResult.device_check``, on the bundle's held-out samples."""

    name: str
    kind: str  # "txt", "jsonl", "npz", "images"
    count: int
    sha256: str
    buckets: tuple[LengthBucket, ...]
    agreement: Agreement | None = None
    agreement_vs: str | None = None  # the artifact compared with, e.g. "onnx/fp32"
    agreement_note: str | None = None  # why there is no agreement, or what it is
    # the prepared inputs, all held in memory for the round-robin: part of the worker's peak RSS (an app would
    # hold one request at a time); texts add the tokenizer
    prepared_mb: float | None = None
    prepared_on: str = "device"  # "host": a remote run's host tokenized / decoded them and sent the arrays

    def describe(self) -> str:
        """'texts.jsonl (jsonl, 200 inputs, sha256 1a2b3c4d5e6f)'."""
        where = ", prepared on the host" if self.prepared_on == "host" else ""
        return f"{self.name} ({self.kind}, {self.count} inputs, sha256 {self.sha256[:12]}{where})"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["buckets"] = [dataclasses.asdict(b) for b in self.buckets]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UserInputsRun:
        return _build(cls, d, buckets=tuple(_build(LengthBucket, b) for b in d.get("buckets") or ()),
                      agreement=_build(Agreement, d["agreement"]) if d.get("agreement") else None)  # type: ignore[no-any-return]


NpuMode = Literal["device", "simulate", "absent"]


@dataclass(frozen=True)
class NpuRun:
    """How a bundle's compiled NPU model (onnx/npu's QNN HTP context binary) was handled on this host.

    ``device``: measured on the Hexagon NPU like any artifact; ``simulate`` (--simulate-npu): numerics on
    the x86 HTP simulator, whose seconds are not a latency; ``absent``: not run, ``presence`` says why.
    """

    mode: NpuMode
    presence: str  # why there is (not) a Hexagon NPU here
    note: str | None = None
    simulated_seconds_per_inference: tuple[float, ...] = ()


class Status(StrEnum):
    """An artifact result's ``status``. SKIPPED and SIMULATED are no failures, but no latency either."""

    OK = "ok"
    ERROR = "error"
    SKIPPED = "skipped"  # an NPU job on a host without the NPU (NpuRun.presence says why)
    SIMULATED = "simulated"  # an NPU job run on the HTP simulator: numerics only


# Nested blocks of an artifact result: JSON key -> (reader, writer).
_BLOCKS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "latency": (lambda d: _build(LatencyStats, d), dataclasses.asdict),
    "energy": (EnergyResult.from_dict, EnergyResult.to_dict),
    "telemetry": (TelemetrySummary.from_dict, TelemetrySummary.to_dict),
    "device_check": (lambda d: _build(Agreement, d), dataclasses.asdict),
    "fidelity": (lambda d: _build(Fidelity, d), Fidelity.to_dict),
    "soak": (Soak.from_dict, Soak.to_dict),
    "user_inputs": (UserInputsRun.from_dict, UserInputsRun.to_dict),
    "npu": (lambda d: _build(NpuRun, d, simulated_seconds_per_inference=tuple(d.get("simulated_seconds_per_inference")
                                                                              or ())), dataclasses.asdict),
}
_INPUT_KEYS = ("input_source", "input_shapes", "input_dtypes", "input_real_tokens")
_MEMORY_KEYS = ("rss_before_load_mb", "rss_after_load_mb", "peak_rss_mb")


@dataclass(frozen=True)
class ArtifactResult:
    """One artifact measured in one worker. ``status`` is a :class:`Status` (on "error", ``error`` says why)."""

    artifact: str
    status: str = Status.ERROR
    error: str | None = None
    traceback: str | None = None
    path: str | None = None
    format: str | None = None
    recipe: str | None = None
    size_bytes: int | None = None
    fidelity: Fidelity | None = None  # the export-time check, from the manifest
    torch_free: bool | None = None
    input: InputInfo | None = None
    load_seconds: float | None = None
    first_inference_ms: float | None = None
    warmup_runs: int | None = None
    measured_seconds: float | None = None
    latency: LatencyStats | None = None
    samples_ns: tuple[int, ...] = ()
    memory: Memory | None = None
    threads: int | None = None
    runtime: Mapping[str, Any] = field(default_factory=dict)  # the backend's own description (info())
    output_shapes: Shapes = field(default_factory=dict)
    energy: EnergyResult | None = None
    telemetry: TelemetrySummary | None = None
    device_check: Agreement | None = None
    per_op: Mapping[str, Any] | None = None  # set here only when the backend cannot time operators
    npu: NpuRun | None = None  # set on the job for a bundle's compiled NPU model
    warnings: tuple[str, ...] = ()
    cpus: tuple[int, ...] = ()  # the CPUs the worker was pinned to (empty: not pinned)
    setting: str | None = None  # a sweep's configuration of this measurement: "threads=2 cores=big"
    repeat_index: int | None = None  # under --repeat K: which round (0..K-1) this fresh process was
    soak: Soak | None = None  # --soak N: RSS over N more inferences and its growth after warm-up
    user_inputs: UserInputsRun | None = None  # --inputs FILE: what was timed, latency by length, agreement

    @property
    def ok(self) -> bool:
        """Measured: latency, memory and the rest are there."""
        return self.status == Status.OK

    @property
    def failed(self) -> bool:
        """An error; a skipped or simulated NPU job is no failure (and no measurement either)."""
        return self.status not in (Status.OK, Status.SKIPPED, Status.SIMULATED)

    @property
    def peak_rss_mb(self) -> float | None:
        return self.memory.peak_rss_mb if self.memory else None

    @property
    def per_op_trace(self) -> Mapping[str, Any] | None:
        """The backend's per-operator timings (--per-op), or the note saying there are none."""
        p = self.runtime.get("per_op") or self.per_op
        return p if isinstance(p, Mapping) else None

    @property
    def notes(self) -> tuple[str, ...]:
        """What the runtime did with the file that the numbers depend on (no SignatureDef, the method of a
        several-method .pte, a delegate that failed...): the backend's own ``notes``."""
        n = self.runtime.get("notes")
        return tuple(str(x) for x in n) if isinstance(n, Sequence) and not isinstance(n, str) else ()

    @property
    def delegate(self) -> Mapping[str, Any] | None:
        d = self.runtime.get("delegate")
        return d if isinstance(d, Mapping) else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _BLOCKS:
                d[f.name] = None if v is None else _BLOCKS[f.name][1](v)
            elif f.name == "input" and v is not None:
                d.update(input_source=v.source, input_shapes=_lists(v.shapes), input_dtypes=dict(v.dtypes),
                         input_real_tokens=v.real_tokens)
            elif f.name == "memory" and v is not None:
                d.update(dataclasses.asdict(v))
            elif f.name == "cpus":  # null when not pinned, like every field a run did not fill
                d[f.name] = list(v) or None
            elif f.name not in ("input", "memory"):
                d[f.name] = _lists(v) if f.name == "output_shapes" else _plain(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArtifactResult:
        kw: dict[str, Any] = {k: v for k, v in d.items() if v is not None}
        kw.update({key: read(d[key]) for key, (read, _) in _BLOCKS.items() if d.get(key)})
        kw.update(artifact=str(d.get("artifact") or "?"), samples_ns=tuple(d.get("samples_ns") or ()),
                  cpus=tuple(d.get("cpus") or ()),
                  warnings=tuple(d.get("warnings") or ()), output_shapes=_shapes(d.get("output_shapes")))
        if any(d.get(k) is not None for k in _INPUT_KEYS):
            kw["input"] = InputInfo(d.get("input_source"), _shapes(d.get("input_shapes")),
                                    dict(d.get("input_dtypes") or {}), d.get("input_real_tokens"))
        if all(d.get(k) is not None for k in _MEMORY_KEYS):
            split = d.get("resident_at_end")
            kw["memory"] = Memory(**{k: float(d[k]) for k in _MEMORY_KEYS},
                                  resident_at_end=Resident.from_dict(split) if isinstance(split, Mapping) else None)
        return _build(cls, kw)  # type: ignore[no-any-return]


def _now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _version() -> str:
    from edgeship import __version__

    return __version__


def _check_version(d: Mapping[str, Any], what: str) -> None:
    v = d.get("schema_version", RESULT_SCHEMA_VERSION)  # runs inside a fleet document carry the fleet's
    if v != RESULT_SCHEMA_VERSION:
        raise ConfigError(f"{what} schema_version {v!r}: this edgeship reads version {RESULT_SCHEMA_VERSION}; "
                          "upgrade edgeship to read it")


@dataclass(frozen=True)
class ProfileResult:
    """Everything one ``edgeship profile`` measured on one machine."""

    device: DeviceInfo
    config: RunConfig | None
    results: tuple[ArtifactResult, ...]
    source: str
    target: str | None
    created_utc: str
    edgeship_version: str
    schema_version: int = RESULT_SCHEMA_VERSION
    notes: tuple[str, ...] = ()  # what the run could not do here (a sweep's core set this host lacks...)

    @classmethod
    def new(cls, device: DeviceInfo, config: RunConfig, results: Sequence[ArtifactResult], source: str,
            target: str | None) -> ProfileResult:
        """A result stamped now, by this edgeship."""
        return cls(device=device, config=config, results=tuple(results), source=source, target=target,
                   created_utc=_now_utc(), edgeship_version=_version())

    @property
    def ok(self) -> bool:
        return not any(r.failed for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device.to_dict(), "config": self.config.to_dict() if self.config else None,
                "results": [r.to_dict() for r in self.results], "source": self.source, "target": self.target,
                "created_utc": self.created_utc, "edgeship_version": self.edgeship_version,
                "schema_version": self.schema_version, **({"notes": list(self.notes)} if self.notes else {})}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProfileResult:
        _check_version(d, "results")
        return cls(device=DeviceInfo.from_dict(d.get("device") or {}),
                   config=RunConfig.from_dict(d["config"]) if d.get("config") else None,
                   results=tuple(ArtifactResult.from_dict(r) for r in d.get("results") or ()),
                   source=str(d.get("source", "")), target=d.get("target"), created_utc=str(d.get("created_utc", "")),
                   edgeship_version=str(d.get("edgeship_version", "")), notes=tuple(d.get("notes") or ()))


@dataclass(frozen=True)
class DeviceRun:
    """One device of a fleet run: how it went, and what it measured (also what finished before a failure)."""

    profile: ProfileResult | None
    url: str | None = None
    identity: Mapping[str, Any] = field(default_factory=dict)  # transport-specific: host, port, host key...
    status: str = "ok"
    error: str | None = None
    timings_s: Mapping[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        dev = self.profile.device if self.profile else DeviceInfo()
        return str(self.url or dev.board or dev.cpu_model or dev.hostname or "local")

    @property
    def ok(self) -> bool:
        return self.status == "ok" and (self.profile is None or self.profile.ok)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = self.profile.to_dict() if self.profile else {"schema_version": RESULT_SCHEMA_VERSION}
        if self.url is not None:
            d.update(device_url=self.url, device_identity=dict(self.identity), status=self.status, error=self.error,
                     timings_s=dict(self.timings_s))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceRun:
        _check_version(d, "results")
        prof = ProfileResult.from_dict(d) if "results" in d else None
        return cls(prof, url=d.get("device_url"), identity=dict(d.get("device_identity") or {}),
                   status=str(d.get("status", "ok")), error=d.get("error"), timings_s=dict(d.get("timings_s") or {}))


@dataclass(frozen=True)
class FleetResult:
    """Several devices in one document: ``{"schema_version": 1, "runs": [...]}``."""

    runs: tuple[DeviceRun, ...]
    schema_version: int = RESULT_SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "runs": [r.to_dict() for r in self.runs]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FleetResult:
        _check_version(d, "results")
        return cls(tuple(DeviceRun.from_dict(r) for r in d.get("runs") or () if isinstance(r, Mapping)))
