"""What went to XNNPACK and what stayed on ExecuTorch's portable kernels, and why.

Read from the lowered edge program (before ``to_executorch``): every
``executorch_call_delegate`` node holds a lowered module whose original graph lists
the ops the delegate runs; every other ``call_function`` node runs on a portable (or
quantized) CPU kernel. "Share of compute" is an estimate from tensor shapes (2*M*N*K
for matrix products and convolutions, one op per output element otherwise) at the
example input shape; ETDump timings (``edgeship profile --per-op``) give the measured
split on a device.

Rejection reasons come from the XNNPACK partitioner itself: its configs log a
``WhyNoPartition`` record for every node they refuse, which :class:`WhyNotCaptured`
collects while lowering. An op with no XNNPACK config at all is reported as such.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from edgeship.exporters.base import module_of

_XNN_CONFIG_LOGGER = "executorch.backends.xnnpack.partition.config"
# bookkeeping nodes that are not compute (memory planning, tuple access, symbolic sizes)
_SKIP = {"getitem", "alloc", "view", "sym_size", "executorch_call_delegate", "sym_numel", "sym_storage_offset"}
_MATMUL = {"linear", "mm", "bmm", "addmm", "matmul", "baddbmm"}
_CONV = {"convolution", "conv2d", "conv1d"}
_HEAVY = {"native_layer_norm": 5, "layer_norm": 5, "_softmax": 3, "softmax": 3, "gelu": 4, "native_group_norm": 5}


class WhyNotCaptured(logging.Handler):
    """Collects the XNNPACK partitioner's per-node rejection reasons (node name -> reason)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        why = record.msg  # a WhyNoPartition object, mutated for the next node: read it now
        node, reason = getattr(why, "node", None), getattr(why, "reason", None)
        if node is not None and reason:
            self.reasons.setdefault(str(getattr(node, "name", node)), str(reason))


@contextlib.contextmanager
def capture_rejections() -> Iterator[WhyNotCaptured]:
    log = logging.getLogger(_XNN_CONFIG_LOGGER)
    handler = WhyNotCaptured()
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # the reasons go into the report, not to the user's terminal at DEBUG
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


@dataclass(frozen=True)
class NotLowered:
    op: str
    node: str
    module: str  # module path from the node's nn_module_stack ("" at the top level)
    module_type: str
    reason: str
    share_of_compute: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DelegationReport:
    backend: str
    delegate_blobs: int
    ops_delegated: int
    ops_portable: int
    compute_share_delegated: float  # of the estimated operations at the example shape
    estimated_gflop: float
    example_shapes: dict[str, list[int]]
    delegated_by_op: dict[str, int]
    portable_by_op: dict[str, int]
    not_lowered: tuple[NotLowered, ...] = field(default_factory=tuple)
    note: str = ("compute shares are shape-based estimates (2*M*N*K for matrix products, one op per output element "
                 "otherwise); edgeship profile --per-op measures them with ETDump")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["not_lowered"] = [n.to_dict() for n in self.not_lowered]
        return d

    def summary(self) -> str:
        top = ", ".join(f"{k} x{v}" for k, v in sorted(self.portable_by_op.items(), key=lambda kv: -kv[1])[:4])
        return (f"{self.ops_delegated} ops in {self.delegate_blobs} {self.backend} blobs "
                f"({100 * self.compute_share_delegated:.1f}% of est. compute), {self.ops_portable} on portable "
                f"kernels{': ' + top if top else ''}")


def op_name(node: torch.fx.Node) -> str:
    """``aten.native_layer_norm.default`` / ``quantized_decomposed.embedding_byte.out`` style names."""
    t: Any = node.target
    if not isinstance(t, torch._ops.OpOverload) and isinstance(getattr(t, "_op", None), torch._ops.OpOverload):
        t = t._op  # an edge-dialect op wraps the ATen overload
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        s = str(t)
        return s[len("aten."):] if s.startswith("aten.") else s
    return str(getattr(t, "__name__", t))


def _base(name: str) -> str:
    """``native_layer_norm.default`` -> ``native_layer_norm``."""
    return name.split(".")[-2] if "." in name else name


def _size(v: Any) -> int:
    if isinstance(v, int):
        return v
    node = getattr(v, "node", None)
    hint = getattr(node, "hint", None)  # a dynamic dim's example value
    if hint is None and node is not None:
        try:
            hint = node.shape_env.size_hint(node.expr)
        except Exception:  # an unhinted symbol: count it as 1 rather than guess
            hint = None
    return int(hint) if hint is not None else 1


def _shape(v: Any) -> list[int]:
    if isinstance(v, torch.Tensor):
        return [_size(d) for d in v.shape]
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        return [_size(d) for d in v[0].shape]
    return []


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def estimate_ops(node: torch.fx.Node) -> float:
    """Rough arithmetic operations of one node at the example shape."""
    name = _base(op_name(node))
    out = _numel(_shape(node.meta.get("val")))
    args = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if name in _MATMUL and args:
        k = _shape(args[0].meta.get("val"))
        return 2.0 * out * (k[-1] if k else 1)
    if name in _CONV and len(args) >= 2:
        w = _shape(args[1].meta.get("val"))
        return 2.0 * out * (_numel(w[1:]) if len(w) > 1 else 1)
    return float(out * _HEAVY.get(name, 1))


def _where(node: torch.fx.Node) -> tuple[str, str]:
    where = module_of(node)
    if where is None or "empty_nn_module_stack" in where[0]:  # nodes executorch's passes made outside any module
        return "", ""
    return where


def _compute_nodes(gm: torch.fx.GraphModule) -> Iterator[torch.fx.Node]:
    for n in gm.graph.nodes:
        if n.op == "call_function" and _base(op_name(n)) not in _SKIP and op_name(n) not in _SKIP:
            yield n


def report(program: Any, supported: set[str], reasons: dict[str, str], backend: str = "XnnpackBackend",
           example_shapes: dict[str, list[int]] | None = None) -> DelegationReport:
    """Delegation report of a lowered program (``ExecutorchProgramManager``, edge manager or ExportedProgram).

    From the ExecuTorch program it reports the kernels that really run (e.g. the fused
    ``embedding_byte``), not the edge ops they were made from.
    """
    ep = program.exported_program() if hasattr(program, "exported_program") else program
    gm = ep.graph_module
    delegated: Counter[str] = Counter()
    delegated_ops = 0.0
    blobs = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and "executorch_call_delegate" in str(n.target):
            lowered = getattr(gm, str(n.args[0].target))
            if getattr(lowered, "backend_id", "") != backend:
                continue
            blobs += 1
            for m in _compute_nodes(lowered.original_module.graph_module):
                delegated[op_name(m)] += 1
                delegated_ops += estimate_ops(m)
    portable: Counter[str] = Counter()
    rows: list[tuple[torch.fx.Node, str, float]] = []
    portable_ops = 0.0
    for n in _compute_nodes(gm):
        name = op_name(n)
        portable[name] += 1
        cost = estimate_ops(n)
        portable_ops += cost
        cfg_name = _base(name).lstrip("_")
        if n.name in reasons:
            why = f"rejected by the XNNPACK partitioner: {reasons[n.name]}"
        elif cfg_name in supported or _base(name) in supported:
            why = "XNNPACK has a config for this op but did not take this node (dtype, shape or neighbours)"
        else:
            why = f"XNNPACK (executorch {_et_version()}) has no partitioner config for {_base(name)}"
        rows.append((n, why, cost))
    total = delegated_ops + portable_ops
    not_lowered = []
    for n, why, cost in rows:
        path, typ = _where(n)
        not_lowered.append(NotLowered(op_name(n), n.name, path, typ, why, round(cost / total, 6) if total else 0.0))
    return DelegationReport(
        backend=backend, delegate_blobs=blobs, ops_delegated=sum(delegated.values()), ops_portable=sum(portable.values()),
        compute_share_delegated=round(delegated_ops / total, 6) if total else 0.0, estimated_gflop=round(total / 1e9, 4),
        example_shapes=dict(example_shapes or {}), delegated_by_op=dict(delegated.most_common()),
        portable_by_op=dict(portable.most_common()), not_lowered=tuple(not_lowered))


def supported_targets(partitioner: Any) -> set[str]:
    """Names of the ops the XNNPACK partitioner has configs for (``linear``, ``add``, ...)."""
    return {str(k).split(".")[0] for k in getattr(partitioner, "target_partitioner_configs", {})}


def _et_version() -> str:
    try:
        from executorch.version import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - executorch is there whenever this runs
        return "?"


__all__ = ["DelegationReport", "NotLowered", "capture_rejections", "estimate_ops", "report", "supported_targets"]
