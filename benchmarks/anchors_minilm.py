"""The anchor pipelines issue 12 measures edgeship against: each stack's own documented int8 path, no edgeship code.

* ``anchor-onnx``: ``torch.onnx.export`` (TorchScript, dynamic batch/sequence) + ``quantize_dynamic`` (int8
  weights), run by a plain ``onnxruntime.InferenceSession``;
* ``anchor-pte``: torchao 8da8w on every ``nn.Linear`` (``Int8DynamicActivationIntxWeightConfig``, int8
  per-channel weights) -> ``torch.export`` (dynamic sequence) -> ``to_edge_transform_and_lower`` with the
  ``XnnpackPartitioner``, run by ``executorch.runtime``;
* ``anchor-tflite``: ``litert_torch.convert`` (128 tokens, static) + ai-edge-quantizer's ``dynamic_wi8_afp32``
  recipe, run by ``ai_edge_litert``'s interpreter.

Built once into a cache directory (``bench_minilm.py --anchors DIR``) and timed beside the bundle's artifacts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]
SEQ = 128


def _args() -> tuple[Any, ...]:
    """(input_ids, attention_mask) of one 128-token text: the example every anchor is captured with."""
    import torch

    return (torch.ones(1, SEQ, dtype=torch.int64), torch.ones(1, SEQ, dtype=torch.int64))


def build_onnx(lm: Any, out: Path) -> None:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = out.with_name(out.stem + "-fp32.onnx")
    names = [s.name for s in lm.inputs]
    torch.onnx.export(lm.module, _args(), str(fp32), dynamo=False, opset_version=17, input_names=names,
                      output_names=["sentence_embedding"], dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    fp32.unlink()


def build_pte(lm: Any, out: Path) -> None:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    m = copy.deepcopy(lm.module).eval()
    quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)))
    seq = torch.export.Dim("sequence", min=2, max=SEQ)
    ep = torch.export.export(m, _args(), dynamic_shapes=({1: seq}, {1: seq}), strict=False)
    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(prog.buffer)


def build_tflite(lm: Any, out: Path) -> None:
    import litert_torch
    from ai_edge_quantizer import quantizer, recipe

    fp32 = out.with_name(out.stem + "-fp32.tflite")
    sample = dict(zip([s.name for s in lm.inputs], _args(), strict=True))
    litert_torch.convert(lm.module.eval(), sample_kwargs=sample).export(str(fp32))
    q = quantizer.Quantizer(str(fp32))
    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    q.quantize().export_model(str(out), overwrite=True)
    fp32.unlink()


def load_onnx(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda feeds: s.run(None, feeds)[0]


def load_pte(path: Path, threads: int) -> Runner:
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return lambda feeds: method.execute([torch.from_numpy(feeds["input_ids"]),
                                         torch.from_numpy(feeds["attention_mask"])])[0].numpy()


def load_tflite(path: Path, threads: int) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path), num_threads=threads).get_signature_runner()
    dtypes = {k: d["dtype"] for k, d in runner.get_input_details().items()}  # litert_torch makes int64 inputs int32

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        pad = SEQ - feeds["input_ids"].shape[1]  # static shape: right-padded like the bundle's LiteRT artifacts
        return next(iter(runner(**{k: np.pad(v, ((0, 0), (0, pad))).astype(dtypes[k]) for k, v in feeds.items()}).values()))
    return run


ANCHORS: dict[str, tuple[str, Callable[[Any, Path], None], Callable[[Path, int], Runner]]] = {
    "anchor-onnx/int8-dynamic": (".onnx", build_onnx, load_onnx),
    "anchor-pte/8da8w": (".pte", build_pte, load_pte),
    "anchor-tflite/int8-dynamic": (".tflite", build_tflite, load_tflite),
}


def anchors(lm: Any, cache: Path, threads: int) -> dict[str, tuple[Path, Runner]]:
    """Each anchor's file (built into ``cache`` unless there already) and a runner for it."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, (suffix, build, load) in ANCHORS.items():
        path = cache / (key.replace("/", "-") + suffix)
        if not path.is_file():
            part = path.with_name(path.name + ".part" + suffix)
            build(lm, part)
            part.rename(path)
        out[key] = (path, load(path, threads))
    return out
