"""Activation smoothing (SmoothQuant, Xiao et al. 2023) for ONNX Runtime's per-tensor int8 activations.

ONNX Runtime's ``DynamicQuantizeLinear`` (int8-dynamic) and a calibrated ``QuantizeLinear`` quantize a whole
activation tensor with one scale. A normalization's output often has a few outlier channels (all-MiniLM-L6-v2:
max |x| of 28.5 in one channel of each FFN input against a median channel's 1.7), so one scale wastes most of
the 256 levels on them. LiteRT and ExecuTorch quantize activations per row, which is why their int8-dynamic
artifacts track PyTorch better (mean cosine 0.998 against ONNX's 0.993 on MiniLM).

Smoothing divides channel ``j`` of a normalization's output by ``s_j`` (folded into its scale and bias) and
multiplies row ``j`` of every linear weight reading it by ``s_j``, with ``s_j = max|x_j|^a / max|w_j|^(1-a)``
from calibration activations: exact in float, and the activation's range flattens. Anything else that reads the
normalization's output (a post-LN transformer's residual ``Add``) reads it through one ``Mul`` by ``s``
restoring the original values (MiniLM: 12 such ``Mul`` on 128 x 384 tensors, 0.11 ms of ORT kernel time per
inference, about 3%, for mean cosine 0.9939 -> 0.9965).

Not applied to a GELU's output (the input of a transformer's second FFN linear): an explicit ``Mul`` there
measured worse (MiniLM mean cosine 0.9908 against 0.9958 without), the GELU's negative tail sharing the
asymmetric uint8 range with the rescaled channels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ALPHA = 0.5  # migration strength: MiniLM's mean cosine 0.9953 / 0.9956 / 0.9958 / 0.9959 / 0.9957 at 0.3-0.85
# a normalization op -> the input indices of its per-channel scale and bias
AFFINE = {"LayerNormalization": (1, 2), "EmbedLayerNormalization": (5, 6)}
_TINY = 1e-5  # floor for a dead channel's activation or a pruned weight row before the power
_LIMIT = 1e3  # bound on s and 1/s, so a dead channel cannot push a scale to inf


def smooth(base: Path, out: Path, feeds: Sequence[Mapping[str, np.ndarray]], alpha: float = ALPHA) -> int:
    """Write ``base`` smoothed to ``out``; the number of normalizations smoothed (0: nothing written)."""
    import onnx

    model = onnx.load(str(base))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in graph.node:
        for k, name in enumerate(node.input):
            users[name].append((node, k))
    plans = [(n, lin) for n in graph.node if (lin := _linears_after(n, users, inits))]
    if not plans:
        return 0
    absmax = _channel_absmax(model, [n.output[0] for n, _ in plans], feeds)
    outputs = {o.name for o in graph.output}
    restore: dict[str, Any] = {}
    for (norm, linears), amax in zip(plans, absmax, strict=True):
        weights = [onnx.numpy_helper.to_array(inits[lin.input[1]]) for lin in linears]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = np.maximum(amax, _TINY) ** alpha / np.maximum(wmax, _TINY) ** (1 - alpha)
        s = np.clip(s, 1 / _LIMIT, _LIMIT).astype(np.float32)
        for i in AFFINE[norm.op_type]:
            if i < len(norm.input) and norm.input[i]:
                values = onnx.numpy_helper.to_array(inits[norm.input[i]]) / s
                if len(users[norm.input[i]]) > 1:  # exporters dedupe equal constants (an untrained norm's ones)
                    norm.input[i] = f"{norm.input[i]}/{norm.output[0]}"  # tensor names are unique, node names optional
                    graph.initializer.add().name = norm.input[i]
                    inits[norm.input[i]] = graph.initializer[-1]
                _replace(inits[norm.input[i]], values)
        for lin, w in zip(linears, weights, strict=True):
            _replace(inits[lin.input[1]], w * s[:, None])
        y = norm.output[0]
        norm.output[0] = f"{y}/smoothed"
        for lin in linears:
            lin.input[0] = norm.output[0]
        if y in outputs or len(users[y]) > len(linears):
            graph.initializer.append(onnx.numpy_helper.from_array(s, f"{y}/smooth_scale"))
            restore[norm.output[0]] = onnx.helper.make_node("Mul", [norm.output[0], f"{y}/smooth_scale"], [y],
                                                       name=f"{y}/unsmooth")
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:  # each restoring Mul right after its normalization: the node list stays topological
        graph.node.append(node)
        if node.output and node.output[0] in restore:
            graph.node.append(restore[node.output[0]])
    onnx.save(model, str(out))
    return len(plans)


def _linears_after(norm: Any, users: Mapping[str, list[tuple[Any, int]]], inits: Mapping[str, Any]) -> list[Any]:
    """The linear ops (``MatMul`` with a constant 2-D weight no other node reads, ORT's fused ``Attention``)
    reading ``norm``'s output as their activation, when ``norm`` is a last-axis normalization with constant
    affine parameters; else []."""
    from onnx import TensorProto

    if norm.op_type not in AFFINE or not norm.output:
        return []
    axis = next((a.i for a in norm.attribute if a.name == "axis"), -1)
    affine = [norm.input[i] for i in AFFINE[norm.op_type] if i < len(norm.input) and norm.input[i]]
    if axis != -1 or not affine or any(a not in inits for a in affine):
        return []
    channels = inits[affine[0]].dims
    if len(channels) != 1 or inits[affine[0]].data_type != TensorProto.FLOAT:
        return []
    linears = []
    for user, k in users.get(norm.output[0], []):
        linear = user.op_type == "MatMul" or (user.op_type == "Attention" and user.domain == "com.microsoft")
        if k == 0 and linear and len(user.input) > 1 and user.input[1] in inits and len(users[user.input[1]]) == 1:
            w = inits[user.input[1]]
            if list(w.dims[:1]) == list(channels) and len(w.dims) == 2 and w.data_type == TensorProto.FLOAT:
                linears.append(user)
    return linears


def _replace(tensor: Any, values: np.ndarray) -> None:
    from onnx import numpy_helper

    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))


def _channel_absmax(model: Any, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """Per-channel (last axis) max |x| of each named tensor over the calibration feeds, run in ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    outputs = model.graph.output
    outputs.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    try:  # serialized with the norms' outputs as graph outputs, then the model is as it was (no copy of the weights)
        probe = model.SerializeToString()
    finally:
        del outputs[len(outputs) - len(names):]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(probe, so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    amax: list[np.ndarray] | None = None
    for feed in feeds:
        got = session.run(list(names), {k: v for k, v in feed.items() if k in wanted})
        now = [np.abs(t).reshape(-1, t.shape[-1]).max(axis=0) for t in got]
        amax = now if amax is None else [np.maximum(a, b) for a, b in zip(amax, now, strict=True)]
    if amax is None:
        raise ValueError("activation smoothing needs at least one calibration input")
    return amax
