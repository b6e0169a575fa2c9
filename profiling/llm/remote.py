"""LLM bundles on remote devices: the ``llm`` job kind of the remote session (``edgeship profile B --device``).

The session (:mod:`edgeship.profiling.remote.session`) does what it does for encoders: probe, push the bundle (only
changed files), provision the device venv, run the agent, stream each artifact's record back, clean up. This job
adds what an LLM needs: the per-format runtime on top of the plain install (onnxruntime-genai for ONNX GenAI
folders; LiteRT is already in it), the context check before anything connects, and results as
:class:`LLMProfileResult` documents that name the device. On the device each artifact runs in a fresh process of
:mod:`edgeship.profiling.llm.bench`, as locally. Host side; torch-free.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgeship.errors import DeviceError, InputError
from edgeship.manifest import ArtifactRecord, Bundle, load_bundle
from edgeship.profiling.llm.bench import ARTIFACT_TIMEOUT_S, LLMRunConfig, check_context
from edgeship.profiling.llm.results import LLMArtifactResult, LLMProfileResult
from edgeship.profiling.llm.runtime import get_llm_runtime
from edgeship.profiling.remote.fleet import FleetProgress, config_for, run_fleet, shared_options
from edgeship.profiling.remote.jobs import RemoteJob, RemoteOutcome
from edgeship.profiling.results import DeviceInfo


@dataclass(frozen=True)
class LLMJob(RemoteJob[LLMProfileResult]):
    """Profile LLM artifacts on the device with :func:`edgeship.profiling.llm.bench.profile_llm`."""

    config: LLMRunConfig
    kind: ClassVar[str] = "llm"

    def check(self, bundle: Bundle | None, artifacts: Sequence[ArtifactRecord]) -> None:
        if bundle is None or bundle.manifest.llm is None:
            raise InputError("remote LLM profiling takes an LLM bundle directory (from edgeship export of a causal LM)")
        check_context(bundle, [a.key for a in artifacts], self.config)
        refused = [(a.key, why) for a in artifacts if (why := get_llm_runtime(a.format).not_provisionable)]
        if refused:
            keys = ", ".join(k for k, _ in refused)
            raise DeviceError(f"{keys}: cannot be profiled on a remote device: {refused[0][1]}; pick the other "
                              "artifacts with --artifact, or install executorch on the device and run edgeship "
                              "profile there")

    def requirements(self, artifacts: Sequence[ArtifactRecord]) -> tuple[str, ...]:
        from edgeship.profiling.remote.wheels import dist_name, extra_requirement, runtime_requirements

        plain = {dist_name(r) for r in runtime_requirements()}
        wanted = [d for a in artifacts for d in get_llm_runtime(a.format).requires if dist_name(d) not in plain]
        return tuple(extra_requirement(d) for d in dict.fromkeys(wanted))

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def timeout_s(self, n_artifacts: int) -> float:
        return ARTIFACT_TIMEOUT_S * max(1, n_artifacts) + 900

    def finish(self, document: Mapping[str, Any] | None, device: DeviceInfo | None,
               streamed: Sequence[Mapping[str, Any]], source: str, outcome: RemoteOutcome) -> LLMProfileResult:
        if document is not None:
            res = LLMProfileResult.from_dict(document)
        else:  # what finished before the failure (maybe nothing), in the same schema
            from edgeship import __version__

            res = LLMProfileResult(device=device or DeviceInfo(), config=self.config,
                                   results=tuple(LLMArtifactResult.from_dict(r) for r in streamed), source=source,
                                   target=None, created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   edgeship_version=__version__)
        return dataclasses.replace(res, device_url=outcome.url, device_identity=dict(outcome.identity),
                                   status=outcome.status, error=outcome.error, timings_s=dict(outcome.timings_s))


def profile_llm_remote(source: str | Path, *, devices: Sequence[str] = (), inventory: str | None = None,
                       config: LLMRunConfig | None = None, artifact: str | None = None,
                       identity: str | None = None, accept_new_host_key: bool = False,
                       known_hosts: str | None = None, transport_options: Mapping[str, Any] | None = None,
                       workdir: str | None = None, progress: FleetProgress | None = None) -> list[LLMProfileResult]:
    """Profile an LLM bundle on every device (``--device`` URLs and ``--inventory`` entries) in parallel.

    One :class:`LLMProfileResult` per device, naming it; a device that fails is a result with ``status="error"``
    holding what it measured before. What no device could run (an unknown artifact, a prompt past the context, a
    runtime edgeship cannot install) is refused here, before anything connects.
    """
    cfg = config or LLMRunConfig()
    bundle = load_bundle(source, verify=True)
    arts = [bundle.manifest.artifact(artifact)] if artifact else list(bundle.manifest.artifacts)
    LLMJob(cfg).check(bundle, arts)
    opts = shared_options(identity, accept_new_host_key, known_hosts, None, transport_options)
    return run_fleet(source, lambda e: LLMJob(config_for(e, cfg)), devices=devices, inventory=inventory,
                     artifact=artifact, transport_options=opts, workdir=workdir,
                     progress=progress or FleetProgress())
