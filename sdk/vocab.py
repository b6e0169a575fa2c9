"""The words both sides of edgeship share: formats, recipes, tasks and energy meters.

Torch-free (the device imports it). Exporters, runner backends, the target schema and the
CLI read these tables instead of typing the names out; ``tests/sdk/test_vocab.py`` checks
that the registries filled by decorators (exporters, backends, meters) agree with them.

A format's *on-disk contract* (where a file keeps its I/O description) is written here once:
the exporter writes it and the device backend reads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Recipe(StrEnum):
    """Precision recipes, cheapest-to-make first. A format offers a subset (its exporter's table)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8_DYNAMIC = "int8-dynamic"
    INT8_STATIC = "int8-static"
    INT4_WEIGHT = "int4-weight"
    NPU = "npu"  # static-shape QDQ compiled for the target's NPU (ONNX: a QNN HTP context binary)


RECIPES: tuple[str, ...] = tuple(r.value for r in Recipe)


@dataclass(frozen=True)
class FormatSpec:
    """One artifact format: file suffix and the device backend that runs it."""

    name: str
    suffix: str
    backend: str  # "module:Class" of the runner backend, imported only when a file of this format runs


# The on-disk contract, shared by exporters/{pte,tflite}.py (writers) and profiling/backends (readers).
PTE_IO_METHOD = "edgeship_io"  # constant method of a .pte holding the I/O description as JSON
TFLITE_SIGNATURE = "serving_default"  # the one signature of a .tflite, inputs/outputs named as in the bundle
TFLITE_METADATA = "edgeship"  # flatbuffer metadata entry holding task, labels and I/O as JSON

FORMATS: dict[str, FormatSpec] = {f.name: f for f in (
    FormatSpec("onnx", ".onnx", "edgeship.profiling.backends.onnx:OnnxBackend"),  # graph I/O carry the bundle's names
    FormatSpec("tflite", ".tflite", "edgeship.profiling.backends.tflite:TfliteBackend"),
    FormatSpec("pte", ".pte", "edgeship.profiling.backends.pte:PteBackend"),
)}
# Formats the device runs that no exporter writes as an artifact of their own: a recipe's companion files,
# run only from a bundle (never picked by suffix). "qnn": the onnx/npu artifact's QNN HTP context model.
DEVICE_FORMATS: dict[str, FormatSpec] = {f.name: f for f in (
    FormatSpec("qnn", ".onnx", "edgeship.profiling.backends.qnn:QnnBackend"),  # an EPContext model + its _qnn.bin
)}


@dataclass(frozen=True)
class LLMFormatSpec:
    """One decoder-LLM artifact format: the export-side module that registers its exporter and the device-side
    runtime that runs it, both imported only when that format is used (each pulls its own heavy library)."""

    name: str
    exporter: str  # module registering the exporter under ``name`` (edgeship.exporters.llm_base.LLM_EXPORTERS)
    runtime: str  # "module:Class" of its edgeship.profiling.llm.runtime.LLMRuntime


LLM_FORMATS: dict[str, LLMFormatSpec] = {f.name: f for f in (
    LLMFormatSpec("onnx", "edgeship.exporters.llm_onnx", "edgeship.profiling.llm.onnx:GenAIRuntime"),
    LLMFormatSpec("pte", "edgeship.exporters.llm_pte", "edgeship.profiling.llm.pte:PteLLMRuntime"),
    LLMFormatSpec("tflite", "edgeship.exporters.llm_tflite", "edgeship.profiling.llm.tflite:TfliteLLMRuntime"),
    LLMFormatSpec("litertlm", "edgeship.exporters.llm_litertlm", "edgeship.profiling.llm.litertlm:LiteRTLMRuntime"),
)}
LLM_RECIPES: tuple[str, ...] = (Recipe.FP32, Recipe.INT8_DYNAMIC, Recipe.INT4_WEIGHT)


@dataclass(frozen=True)
class TaskSpec:
    """What a task's model takes and gives, and how an export of it is judged against PyTorch."""

    name: str
    inputs: str  # "text" (token ids + mask), "image" (pixel values) or "custom" (the user's example inputs)
    classifier: bool  # fidelity also reports top-1 agreement on the first output


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("feature-extraction", "text", False),  # pooled sentence embeddings
    TaskSpec("sequence-classification", "text", True),
    TaskSpec("token-classification", "text", True),  # one label per token
    TaskSpec("image-classification", "image", True),
    TaskSpec("custom", "custom", False),  # an nn.Module with the user's example inputs and output names
)}
TEXT_TASKS: tuple[str, ...] = tuple(t.name for t in TASKS.values() if t.inputs == "text")

# Energy meters by registry name (edgeship.profiling.meters registers one class per name).
METERS: tuple[str, ...] = ("rapl", "hwmon", "rpi5-pmic", "jetson", "android-battery", "android-odpm", "csv",
                           "estimate")


def listing(names: Iterable[object]) -> str:
    """``a, b, c`` for help texts and error messages."""
    return ", ".join(str(n) for n in names)


__all__ = ["DEVICE_FORMATS", "FORMATS", "LLM_FORMATS", "LLM_RECIPES", "METERS", "PTE_IO_METHOD", "RECIPES", "TASKS",
           "TEXT_TASKS", "TFLITE_METADATA", "TFLITE_SIGNATURE", "FormatSpec", "LLMFormatSpec", "Recipe", "TaskSpec",
           "listing"]
