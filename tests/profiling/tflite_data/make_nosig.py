"""Regenerate the signature-less ``.tflite`` test files (needs ai-edge-litert; no TensorFlow, no torch).

Most ``.tflite`` files in the wild have no SignatureDef: a vision pipeline's converter, an old
TF1 export, a hand-built graph. The runner must take them by tensor index, so the tests need
such files, made here through the flatbuffer schema that ai-edge-litert ships
(``ai_edge_litert.schema_py_generated``):

* ``tiny_nosig.tflite``: ``tiny.tflite`` (one of our own exports) with its SignatureDef removed.
* ``uint8_io.tflite``: uint8 input [-1, 8] -> DEQUANTIZE -> FULLY_CONNECTED -> QUANTIZE -> uint8
  output [-1, 4] (:func:`uint8_model` takes other weight shapes too), the I/O of a quantized vision model, with a dynamic batch dim.
  ``uint8_io.npz`` holds its weights, quantization and one input with the output LiteRT gave.

Run ``python tests/profiling/tflite_data/make_nosig.py``; the files are committed because the
tflite-runtime CI job has neither ai-edge-litert nor its schema module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as fb

HERE = Path(__file__).parent
IN_SCALE, IN_ZERO = 1 / 32, 128  # inputs cover [-4, 4)
OUT_SCALE, OUT_ZERO = 0.05, 100


def _pack(model: Any) -> bytes:
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def strip_signatures(src: Path, dst: Path) -> None:
    model = fb.ModelT.InitFromPackedBuf(bytearray(src.read_bytes()), 0)
    model.signatureDefs = []
    dst.write_bytes(_pack(model))


def _tensor(name: str, shape: list[int], dtype: int, buffer: int = 0, quant: tuple[float, int] | None = None) -> Any:
    t = fb.TensorT()
    t.name, t.type, t.buffer = name.encode(), dtype, buffer
    t.shape = [1 if d < 0 else d for d in shape]
    t.shapeSignature = list(shape)
    if quant:
        q = fb.QuantizationParametersT()
        q.scale, q.zeroPoint = [float(quant[0])], [int(quant[1])]
        t.quantization = q
    return t


def _op(code: int, ins: list[int], outs: list[int], options: Any = None, kind: int = 0) -> Any:
    o = fb.OperatorT()
    o.opcodeIndex, o.inputs, o.outputs = code, ins, outs
    if options is not None:
        o.builtinOptionsType, o.builtinOptions = kind, options
    return o


def uint8_model(weight: np.ndarray, bias: np.ndarray) -> bytes:
    buffers = [fb.BufferT() for _ in range(3)]  # 0: the empty sentinel every model starts with
    buffers[1].data = list(weight.astype("<f4").tobytes())
    buffers[2].data = list(bias.astype("<f4").tobytes())
    u8, f32 = fb.TensorType.UINT8, fb.TensorType.FLOAT32
    sg = fb.SubGraphT()
    n_out, n_in = (int(x) for x in weight.shape)
    sg.tensors = [_tensor("pixels", [-1, n_in], u8, quant=(IN_SCALE, IN_ZERO)), _tensor("pixels_float", [-1, n_in], f32),
                  _tensor("fc_weight", [n_out, n_in], f32, 1), _tensor("fc_bias", [n_out], f32, 2),
                  _tensor("fc_out", [-1, n_out], f32), _tensor("scores", [-1, n_out], u8, quant=(OUT_SCALE, OUT_ZERO))]
    sg.inputs, sg.outputs, sg.name = [0], [5], b"main"
    fc = fb.FullyConnectedOptionsT()
    sg.operators = [_op(0, [0], [1]), _op(1, [1, 2, 3], [4], fc, fb.BuiltinOptions.FullyConnectedOptions),
                    _op(2, [4], [5])]
    codes = []
    for c in (fb.BuiltinOperator.DEQUANTIZE, fb.BuiltinOperator.FULLY_CONNECTED, fb.BuiltinOperator.QUANTIZE):
        oc = fb.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = c, min(c, 127), 1
        codes.append(oc)
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, codes, [sg], buffers
    model.description = b"edgeship test: uint8 I/O, no SignatureDef"
    return _pack(model)


def main() -> None:
    from ai_edge_litert.interpreter import Interpreter

    strip_signatures(HERE / "tiny.tflite", HERE / "tiny_nosig.tflite")
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 8)).astype(np.float32) * 0.5
    bias = rng.standard_normal(4).astype(np.float32)
    (HERE / "uint8_io.tflite").write_bytes(uint8_model(weight, bias))
    x = rng.integers(0, 256, size=(2, 8)).astype(np.uint8)
    it = Interpreter(model_path=str(HERE / "uint8_io.tflite"))
    assert not it.get_signature_list()
    it.resize_tensor_input(0, [2, 8])
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    y = it.get_tensor(it.get_output_details()[0]["index"])
    np.savez(HERE / "uint8_io.npz", weight=weight, bias=bias, pixels=x, scores=y,
             quant=np.array([IN_SCALE, IN_ZERO, OUT_SCALE, OUT_ZERO], np.float64))


if __name__ == "__main__":
    main()
