"""The Snapdragon Hexagon NPU through ``onnxruntime-qnn`` (torch-free; the device side).

A bundle's ``onnx/npu`` artifact is a static-shape QDQ model (the portable fallback, run by the
plain ONNX backend) plus a QNN HTP *context model*: an ONNX file whose ``EPContext`` node points at
a compiled ``*_qnn.bin`` for one Hexagon architecture. :class:`QnnBackend` loads that context model
with the QNN execution provider.

Where it runs:

* an ARM64 Snapdragon host (Linux or Android) with ``onnxruntime-qnn`` and a Hexagon DSP device
  node: the context binary runs on the NPU and is profiled like any artifact;
* anywhere else (this x86 build machine): there is no NPU. ``onnxruntime-qnn``'s x86 wheel runs the
  same context binary on Qualcomm's HTP *simulator*, which is good for numerics only: one MiniLM
  inference took ~6-9 s there, so simulated timings are never reported as latency.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.errors import ArtifactLoadError, ChecksumError, RuntimeMissingError
from edgeship.manifest import Fidelity
from edgeship.profiling.backends import Backend
from edgeship.profiling.results import Agreement, ArtifactResult, NpuMode, NpuRun, Status
from edgeship.spec import TensorSpec, dim_name
from edgeship.vocab import DEVICE_FORMATS

EP_NAME = "QNNExecutionProvider"
QNN_FORMAT = "qnn"  # its vocab.DEVICE_FORMATS entry: the context model runs from a bundle, never by suffix
INSTALL_HINT = "pip install 'edgeship[npu]' (brings onnxruntime-qnn)"
# Device nodes through which user space reaches the Hexagon compute DSP (FastRPC): upstream Linux
# names them fastrpc-cdsp*, Android kernels adsprpc-smd. Without one the HTP backend cannot offload.
HEXAGON_NODES = ("/dev/fastrpc-cdsp*", "/dev/adsprpc-smd*")
SIMULATED = "SIMULATED (x86 HTP simulator)"
_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8",
          "tensor(uint16)": "uint16", "tensor(float16)": "float16", "tensor(bool)": "bool"}


@dataclass(frozen=True)
class HtpPresence:
    present: bool
    reason: str


def htp_presence() -> HtpPresence:
    """Whether this host can run a QNN context binary on a real Hexagon NPU, and why not."""
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return HtpPresence(False, f"onnxruntime-qnn is not installed ({INSTALL_HINT})")
    machine = platform.machine().lower()
    if machine not in ("aarch64", "arm64"):
        return HtpPresence(False, f"no Hexagon NPU is present: this is a {machine} host; onnxruntime-qnn runs "
                                  "only its HTP simulator here (numerics, not latency)")
    nodes = [p for pattern in HEXAGON_NODES for p in glob(pattern)]
    if not nodes:
        return HtpPresence(False, "no Hexagon NPU is present: no FastRPC device node "
                                  f"({', '.join(HEXAGON_NODES)}) on this ARM64 host")
    return HtpPresence(True, f"Hexagon DSP reachable through {nodes[0]}")


def register_qnn() -> Any:
    """Import onnxruntime, register the QNN plugin EP once per process, return its EP device."""
    try:
        import onnxruntime as ort
        import onnxruntime_qnn as qnn
    except ImportError as e:
        raise RuntimeMissingError(f"the QNN execution provider needs onnxruntime-qnn ({e}); {INSTALL_HINT}") from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise RuntimeMissingError(f"onnxruntime {ort.__version__} registered onnxruntime-qnn but lists no "
                                  f"{EP_NAME} device; onnxruntime-qnn {qnn.__version__} needs onnxruntime >= 1.24")
    return devices[0]


def qnn_versions() -> dict[str, str]:
    """onnxruntime, onnxruntime-qnn and the QNN SDK (QAIRT) it ships."""
    import onnxruntime as ort
    import onnxruntime_qnn as qnn
    from onnxruntime_qnn import build_and_package_info as info

    return {"onnxruntime": ort.__version__, "onnxruntime_qnn": qnn.__version__,
            "qnn_sdk": str(getattr(info, "qnn_version", "unknown"))}


def session_options(htp_arch: int | str, soc_model: int | str, log_level: int = 3) -> Any:
    """SessionOptions with the QNN HTP backend for one Hexagon arch / SoC (log_level 0 = verbose)."""
    import onnxruntime as ort
    import onnxruntime_qnn as qnn

    device = register_qnn()
    so = ort.SessionOptions()
    so.log_severity_level = log_level
    so.add_provider_for_devices([device], {"backend_path": qnn.get_qnn_htp_path(), "htp_arch": str(htp_arch),
                                           "soc_model": str(soc_model)})
    return so


class QnnBackend(Backend):
    """A QNN HTP context model on the Hexagon NPU, or (``simulate=True``) on the x86 HTP simulator."""

    format: ClassVar[str] = QNN_FORMAT
    suffix: ClassVar[str] = DEVICE_FORMATS[QNN_FORMAT].suffix
    options_accepted: ClassVar[tuple[str, ...]] = ("htp_arch", "soc_model", "simulate")

    def __init__(self, path: Path, threads: int | None = None, options: Mapping[str, Any] | None = None) -> None:
        opts = self.checked_options(options)
        self.simulated = str(opts.get("simulate", False)).lower() in ("1", "true", "yes")
        presence = htp_presence()
        if not presence.present and not self.simulated:
            raise RuntimeMissingError(f"{path.name}: cannot run on the NPU: {presence.reason}; run "
                                      "`edgeship profile BUNDLE --simulate-npu` for a numerics check on the simulator")
        if "htp_arch" not in opts or "soc_model" not in opts:
            raise ArtifactLoadError(f"{path.name}: the QNN backend needs the options htp_arch and soc_model "
                                    "(the bundle manifest records them)")
        import onnxruntime as ort

        so = session_options(opts["htp_arch"], opts["soc_model"])
        if threads:
            so.intra_op_num_threads = int(threads)  # the CPU part (e.g. a graph-output DequantizeLinear)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so)
        except Exception as e:  # ORT raises its own Fail / RuntimeException types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactLoadError(f"{path}: the QNN EP cannot load this context model ({first[:300]}); its "
                                    "_qnn.bin must sit beside it and match the device's Hexagon arch") from None
        self.path, self.threads, self.presence = path, threads, presence
        self.htp = {"htp_arch": str(opts["htp_arch"]), "soc_model": str(opts["soc_model"])}
        # anonymous dims named by position, as the ONNX backend does (a leading one then defaults to batch 1)
        self.inputs = tuple(TensorSpec(i.name, _TYPES.get(i.type, "float32"),
                                       tuple(dim_name(i.name, k, d) for k, d in enumerate(i.shape)))
                            for i in self.session.get_inputs())
        self.outputs = tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.session.run(None, dict(feeds))
        return {n: np.asarray(v) for n, v in zip(self.outputs, res, strict=True)}

    def info(self) -> dict[str, Any]:
        return {"runtime": "onnxruntime + QNNExecutionProvider (HTP)", **qnn_versions(), **self.htp,
                "threads": self.threads, "providers_used": list(self.session.get_providers()),
                "backend_ran": SIMULATED if self.simulated else "Hexagon NPU (QNN HTP)",
                "simulated": self.simulated, "npu_presence": self.presence.reason}


# ---- bundle plumbing: which file, which options, and the jobs `edgeship profile` adds -------------
def npu_details(art: Any) -> dict[str, Any] | None:
    """The ``details["npu"]`` record of a manifest artifact, if it carries a compiled NPU model."""
    d = (getattr(art, "details", None) or {}).get("npu")
    return d if isinstance(d, dict) and d.get("context_model") else None


def context_files(bundle: Any, art: Any) -> tuple[Path, dict[str, Any]]:
    """The context model path and its load options; checks both files against the manifest's sha256."""
    from edgeship.manifest import sha256_file

    npu = npu_details(art)
    if npu is None:
        raise ArtifactLoadError(f"{art.key}: no compiled NPU context model in this artifact")
    for f in npu["files"]:
        p = bundle.root / f["path"]
        if not p.is_file():
            raise ChecksumError(f"bundle {bundle.root}: NPU file {f['path']} is missing; re-export or re-copy it")
        if p.stat().st_size != f["size_bytes"] or sha256_file(p) != f["sha256"]:
            raise ChecksumError(f"bundle {bundle.root}: NPU file {f['path']} fails its checksum; re-export or re-copy it")
    opts = {"htp_arch": npu["htp_arch"], "soc_model": npu["soc_model"]}
    return bundle.root / npu["context_model"], opts


def npu_mode(simulate: bool) -> NpuMode:
    """How this host handles a compiled NPU model: ``device`` (a Hexagon NPU is here: measured like any
    artifact), ``simulate`` (numerics on the simulator, asked for with --simulate-npu) or ``absent``."""
    return "device" if htp_presence().present else ("simulate" if simulate else "absent")


def _ident(art: Any, npu: Mapping[str, Any], run: NpuRun) -> ArtifactResult:
    """The identity of an NPU job's result: the context model, its size and the export's simulator check."""
    fid = npu.get("simulator_fidelity")
    return ArtifactResult(artifact=f"{art.key}@htp", format=QNN_FORMAT, recipe=art.recipe, path=npu.get("context_model"),
                          size_bytes=npu.get("size_bytes", 0), fidelity=Fidelity.from_dict(fid) if fid else None, npu=run)


def open_context(bundle: Any, art: Any) -> tuple[ArtifactResult, Path, dict[str, Any]]:
    """A ``device`` job: the result's identity, the checked context model and its load options."""
    path, opts = context_files(bundle, art)
    return _ident(art, npu_details(art) or {}, NpuRun("device", htp_presence().reason)), path, opts


def run_without_npu(job: Any) -> ArtifactResult:
    """An ``absent`` job (why there is no NPU run) or a ``simulate`` job (simulator numerics, no latency)."""
    from edgeship.manifest import load_bundle

    bundle = load_bundle(job.bundle, verify=False)
    art = bundle.manifest.artifact(job.artifact)
    presence = htp_presence()
    base = _ident(art, npu_details(art) or {}, NpuRun(job.npu, presence.reason))
    if job.npu == "absent":
        note = (f"{presence.reason}; `edgeship profile --simulate-npu` checks the context binary's numerics on the "
                "HTP simulator")
        return dataclasses.replace(base, status=Status.SKIPPED, npu=NpuRun("absent", presence.reason, note))
    try:
        return _simulate(bundle, art, base)
    except Exception as e:  # a failed simulator run is a result, not a crash of the whole profile
        return dataclasses.replace(base, status=Status.ERROR,
                                   error=f"HTP simulator: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


def _simulate(bundle: Any, art: Any, base: ArtifactResult, limit: int = 4) -> ArtifactResult:
    """Run the bundle's held-out samples (at most ``limit``: the simulator is slow) and compare."""
    from edgeship.fidelity import compare

    path, opts = context_files(bundle, art)
    model = QnnBackend(path, options={**opts, "simulate": True})
    with np.load(bundle.root / bundle.manifest.samples["inputs"]) as zi, \
            np.load(bundle.root / bundle.manifest.samples["outputs"]) as zo:
        inputs = {k: zi[k] for k in zi.files}
        outputs = {k: zo[k] for k in zo.files}
    name = bundle.manifest.outputs[0].name
    n = min(limit, next(iter(inputs.values())).shape[0])
    got, ref, secs = [], [], []
    for i in range(n):
        t0 = time.perf_counter_ns()
        got.append(model.run(model.adapt_feeds({k: v[i:i + 1] for k, v in inputs.items()}))[name])
        secs.append((time.perf_counter_ns() - t0) / 1e9)
        ref.append(outputs[name][i:i + 1])
    f = compare(ref, got, name, 0.0, classifier=bundle.manifest.model.get("task", "").endswith("classification"))
    note = (f"{SIMULATED}: numerics of the compiled context binary on {n} bundle sample(s); the simulator's "
            f"{np.mean(secs):.1f} s per inference is NOT a latency")
    assert base.npu is not None
    return dataclasses.replace(
        base, status=Status.SIMULATED, runtime=model.info(),
        device_check=Agreement(f.output, f.n_samples, f.max_abs_err, f.mean_abs_err, f.mean_cosine, f.min_cosine,
                               f.top1_agreement),
        npu=dataclasses.replace(base.npu, note=note, simulated_seconds_per_inference=tuple(secs)))


# ---- text for `edgeship inspect` (the profile report's NPU lines: report.npu_line) -------------------
def coverage_lines(npu: Mapping[str, Any]) -> list[str]:
    """The HTP coverage table of one NPU artifact, from its manifest record."""
    from edgeship.profiling.report import table

    cov = npu.get("coverage") or {}
    head = (f"QNN HTP v{npu.get('htp_arch')} (soc_model {npu.get('soc_model')}), QNN SDK "
            f"{(npu.get('versions') or {}).get('qnn_sdk', '?')}, {cov.get('partitions', '?')} HTP partition(s), "
            f"context model {npu.get('context_model')} + {npu.get('context_binary')}")
    rows = [["HTP", str(cov.get("nodes_htp", "-")), _mflops(cov.get("flops_htp")), _pct(cov.get("flops_share_htp")), ""],
            ["CPU", str(cov.get("nodes_cpu", "-")), _mflops(cov.get("flops_cpu")),
             _pct(1.0 - cov["flops_share_htp"]) if "flops_share_htp" in cov else "-", ""]]
    for f in cov.get("fell_out", []):
        rows.append([f"  {f['op_type']}", str(f["nodes"]), _mflops(f.get("flops")), "", str(f.get("reason", ""))[:100]])
    lines = [head, table(rows, ["placement", "nodes", "MFLOP (est)", "FLOPs %", "why not on the HTP"])]
    sim = npu.get("simulator_fidelity") or {}
    if sim:
        lines.append(f"simulator ({SIMULATED}): mean cosine {sim.get('mean_cosine', 0):.4f} vs PyTorch on "
                     f"{sim.get('n_samples')} input(s), min {sim.get('min_cosine', 0):.4f}")
    return lines


def _mflops(v: Any) -> str:
    return "-" if v is None else f"{float(v) / 1e6:.3f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100.0 * float(v):.1f}"


__all__ = ["EP_NAME", "HtpPresence", "QnnBackend", "context_files", "coverage_lines", "htp_presence", "npu_details",
           "npu_mode", "open_context", "qnn_versions", "register_qnn", "run_without_npu", "session_options"]
