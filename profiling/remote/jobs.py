"""What a remote run measures, apart from how the session reaches and prepares the device.

The session (:mod:`.session`) pushes the bundle, provisions the runtime and runs the agent; a :class:`RemoteJob`
says which runner the agent starts (its ``kind``), with which config, what the device needs on top of edgeship's
plain runtime, and how the records the agent streams back become the caller's result. Two kinds exist:
``encoder`` (the ordinary runner, :class:`EncoderJob` here, results are :class:`DeviceRun`) and ``llm``
(:class:`edgeship.profiling.llm.remote.LLMJob`, results are ``LLMProfileResult`` naming the device).

Host side only; the device side of a kind is registered in :mod:`.agent`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from edgeship.manifest import ArtifactRecord, Bundle
from edgeship.profiling.results import ArtifactResult, DeviceInfo, DeviceRun, ProfileResult, RunConfig

RunT = TypeVar("RunT")


@dataclass(frozen=True)
class RemoteOutcome:
    """How one device's run went, whatever the job measured: what a result adds to a local one."""

    url: str
    identity: Mapping[str, Any] = field(default_factory=dict)
    status: str = "ok"  # "ok" | "error"
    error: str | None = None
    timings_s: Mapping[str, float] = field(default_factory=dict)


class RemoteJob(ABC, Generic[RunT]):
    """One kind of measurement run by the device agent; ``RunT`` is what a device's run returns."""

    kind: ClassVar[str]

    def check(self, bundle: Bundle | None, artifacts: Sequence[ArtifactRecord]) -> None:
        """Refuse, before anything connects, what the device cannot run (default: everything can)."""

    def requirements(self, artifacts: Sequence[ArtifactRecord]) -> tuple[str, ...]:
        """Distributions the device needs on top of edgeship's plain runtime (pip requirement strings)."""
        return ()

    def inputs(self) -> str | None:
        """The user's inputs (a file or an image folder, --inputs) to push with the bundle; the agent's config
        then names the device's copy (default: none)."""
        return None

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The run config as the agent's job file carries it."""

    @abstractmethod
    def timeout_s(self, n_artifacts: int) -> float:
        """How long the agent may run before the host gives up on it."""

    @abstractmethod
    def finish(self, document: Mapping[str, Any] | None, device: DeviceInfo | None,
               streamed: Sequence[Mapping[str, Any]], source: str, outcome: RemoteOutcome) -> RunT:
        """The device's result: from the agent's final ``document``, or (after a failure, ``document`` None) from
        the per-artifact records it ``streamed`` before, in the same schema."""


@dataclass(frozen=True)
class EncoderJob(RemoteJob[DeviceRun]):
    """The ordinary runner (:func:`edgeship.profiling.runner.profile`) on the device."""

    config: RunConfig
    kind: ClassVar[str] = "encoder"

    def inputs(self) -> str | None:
        return self.config.inputs

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def timeout_s(self, n_artifacts: int) -> float:
        return self.config.max_seconds * 3 * max(1, n_artifacts) + 900

    def finish(self, document: Mapping[str, Any] | None, device: DeviceInfo | None,
               streamed: Sequence[Mapping[str, Any]], source: str, outcome: RemoteOutcome) -> DeviceRun:
        if document is not None:
            prof: ProfileResult | None = ProfileResult.from_dict(document)
        elif streamed or device:
            prof = ProfileResult.new(device or DeviceInfo(), self.config,
                                     [ArtifactResult.from_dict(r) for r in streamed], source, None)
        else:
            prof = None
        return DeviceRun(prof, url=outcome.url, identity=dict(outcome.identity), status=outcome.status,
                         error=outcome.error, timings_s=dict(outcome.timings_s))
