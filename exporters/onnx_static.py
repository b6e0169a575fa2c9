"""int8-static on an attention-fused ONNX graph: ONNX Runtime's fused int8 kernels with calibrated activation scales.

Why not QDQ here: on all-MiniLM-L6-v2 at 128 dense tokens (ORT 1.32, 2 threads) QDQ int8 on the unfused
dynamo graph ran 9.4 ms against int8-dynamic's 4.9 ms. Its profile: 31 ``QLinearMatMul`` 2.0 ms, 11 float
``MatMul`` 2.6 ms (5 linears the search kept in float, because quantizing every linear's *output* cost
accuracy, plus the unfused attention's matmuls), 63 ``Add`` 1.2 ms, 44 ``DequantizeLinear`` 0.75 ms, 24
``Transpose`` 0.56 ms, ``Erf`` / ``Softmax`` / ``Div`` around 0.8 ms. No QDQ selector in ORT maps onto
``QAttention`` or ``BiasGelu``, so QDQ cannot reach the fused graph int8-dynamic runs.

So the fused graph is quantized the way int8-dynamic is (``QAttention``, ``QEmbedLayerNormalization``,
``MatMulInteger``; the exporter's ``_dynamic_int8``) and then every ``DynamicQuantizeLinear`` whose input has a calibrated range becomes a
``QuantizeLinear`` with a constant scale and zero point (:func:`make_static`). Same kernels, minus the
run-time min/max; activations are quantized only where a linear layer reads them, never a layer's output.

Trap: ORT fuses ``MatMulInteger`` + ``Cast`` + ``Mul`` into ``MatMulIntegerToFloat`` only when the scale
product is a ``Mul`` node; with constant scales, constant folding removes that node first and the three ops
stayed unfused (6 ``MatMulInteger`` at 2.5 ms where 12 fused ones took 4.4). :func:`make_static` writes
``MatMulIntegerToFloat`` itself.

Second trap: ONNX's own shape inference does not type the outputs of contrib ops (``Attention``,
``BiasGelu``), so ORT's calibrators skipped them and the inputs of 12 of the 18 linears stayed dynamic.
:func:`typed_for_calibration` runs ORT's symbolic shape inference first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import ExportError

FUSED_LINEAR_OPS = ("MatMul", "Attention")  # what a torch nn.Linear becomes in the fused graph


def typed_for_calibration(base: Path, out: Path) -> Path:
    """``base`` with every tensor typed (contrib ops included), so calibrators collect ranges for all of them."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    if out.is_file():
        return out
    model = SymbolicShapeInference.infer_shapes(onnx.load(str(base)), auto_merge=True, guess_output_rank=True)
    onnx.save(model, str(out))
    return out


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def fused_linear_nodes(path: Path, weights: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Map torch layer names to the fused graph's nodes by weight identity.

    The TorchScript graph carries no module scopes after ORT's fusion, but it carries the weights bit for
    bit: a ``MatMul`` holds ``W.T``, an ``Attention`` node holds ``[Wq.T | Wk.T | Wv.T]`` (so q, k and v map to
    one node, and keeping any of them in float keeps that node). ``weights``: torch name -> ``nn.Linear.weight``.
    """
    import onnx
    from onnx import numpy_helper

    by_digest = {_digest(w.T): name for name, w in weights.items() if w.ndim == 2}
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    out: dict[str, str] = {}
    for node in m.graph.node:
        if node.op_type not in FUSED_LINEAR_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        parts = np.split(w, 3, axis=1) if node.op_type == "Attention" and w.shape[1] % 3 == 0 else [w]
        for part in parts:
            name = by_digest.get(_digest(part))
            if name is not None:
                out.setdefault(name, node.name)
    return out


def _uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 range that contains 0 (as DynamicQuantizeLinear computes them)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def make_static(src: Path, out: Path, ranges: Any) -> int:
    """Rewrite a dynamically quantized graph with calibrated activation scales; returns how many became static.

    ``ranges``: ORT calibration ``TensorsData`` (tensor name -> ``range_value`` (lo, hi)). Raises when an
    activation has no range: a half-static graph would look static and run dynamic.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    const: dict[str, str] = {}  # dynamic scale / zero-point tensor -> the constant that replaces it
    nodes: list[Any] = []
    for n in g.node:
        if n.op_type != "DynamicQuantizeLinear":
            nodes.append(n)
            continue
        if n.input[0] not in ranges:
            raise ExportError(f"onnx/int8-static: no calibrated range for '{n.input[0]}', the input of a quantized layer")
        rv = ranges[n.input[0]].range_value
        scale, zp = _uint8_params(float(np.min(rv[0])), float(np.max(rv[1])))
        s_name, z_name = n.output[1] + "_static", n.output[2] + "_static"
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s_name),
                              numpy_helper.from_array(np.array(zp, np.uint8), z_name)])
        const[n.output[1]], const[n.output[2]] = s_name, z_name
        nodes.append(helper.make_node("QuantizeLinear", [n.input[0], s_name, z_name], [n.output[0]], name=n.name))
    for n in nodes:
        for i, name in enumerate(n.input):
            n.input[i] = const.get(name, name)
    nodes = _fuse_integer_matmuls(nodes, {i.name: i for i in g.initializer})
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return len(const) // 2


def _fuse_integer_matmuls(nodes: list[Any], inits: Mapping[str, Any]) -> list[Any]:
    """``MatMulInteger`` -> ``Cast`` -> ``Mul`` (by the constant product of two scales) [-> ``Add`` bias] into
    one ``MatMulIntegerToFloat``."""
    from onnx import helper

    made = {o: n for n in nodes for o in n.output}
    users: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    drop: set[int] = set()
    fused: dict[int, Any] = {}
    for n in nodes:
        chain = _integer_matmul_chain(n, made, users, inits)
        if chain is None:
            continue
        cast, mul, scales = chain
        ins, out, last = [n.input[0], n.input[1], *scales.input, *n.input[2:4]], mul.output[0], mul
        add = _only_user(users, out, "Add")
        bias = [i for i in add.input if i != out] if add is not None else []
        if add is not None and len(bias) == 1 and bias[0] in inits and len(inits[bias[0]].dims) == 1:
            ins, out, last = [*ins, bias[0]], add.output[0], add  # the linear's bias, folded in
            drop.add(id(mul))
        fused[id(last)] = helper.make_node("MatMulIntegerToFloat", ins, [out], name=n.name + "_to_float",
                                           domain="com.microsoft")
        drop |= {id(n), id(cast), id(scales)}
    return [fused.get(id(n), n) for n in nodes if id(n) not in drop]


def _integer_matmul_chain(n: Any, made: Mapping[str, Any], users: Mapping[str, list[Any]],
                          inits: Mapping[str, Any]) -> tuple[Any, Any, Any] | None:
    """(Cast, output Mul, scale Mul) after a statically quantized ``MatMulInteger``, or None."""
    if n.op_type != "MatMulInteger" or len(n.input) != 4:
        return None
    src = made.get(n.input[0])
    if src is None or src.op_type != "QuantizeLinear":
        return None
    cast = _only_user(users, n.output[0], "Cast")
    mul = _only_user(users, cast.output[0], "Mul") if cast is not None else None
    if cast is None or mul is None:
        return None
    other = [i for i in mul.input if i != cast.output[0]]
    scales = made.get(other[0]) if len(other) == 1 else None
    if scales is None or scales.op_type != "Mul" or not all(s in inits for s in scales.input):
        return None
    return cast, mul, scales


def _only_user(users: Mapping[str, list[Any]], tensor: str, op_type: str) -> Any:
    found = users.get(tensor, [])
    return found[0] if len(found) == 1 and found[0].op_type == op_type else None


__all__ = ["fused_linear_nodes", "make_static", "typed_for_calibration"]
