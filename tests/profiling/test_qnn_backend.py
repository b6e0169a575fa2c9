"""The QNN side without a compile: NPU presence, the backend's refusal, the EP log parser, coverage maths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import ArtifactLoadError, ConfigError, RuntimeMissingError
from edgeship.profiling.backends import qnn

# the QNN EP's verbose validation lines, as onnxruntime-qnn 2.7.0 wrote them for an Erf-GELU MiniLM
LOG = """\
2026-12-01 23:14:21.681391268 [V:onnxruntime:, qnn_execution_provider.cc:1713 LogNodeSupport] Validation PASSED for 1 nodes in OrtNodeUnit (Unsqueeze) :
2026-12-01 23:14:21.764581900 [V:onnxruntime:, qnn_execution_provider.cc:1713 LogNodeSupport] Validation FAILED for 3 nodes in OrtNodeUnit (Erf) :
\tOperator type: DequantizeLinear Node name: val_58_DequantizeLinear Node index: 215
\tOperator type: Erf Node name: node_Erf_55 Node index: 216
\tOperator type: QuantizeLinear Node name: val_59_QuantizeLinear Node index: 217
\tREASON : Operators of type `Erf` are not supported by QNN EP.Erf node `node_Erf_55` will not be assigned to QNN EP.

2026-12-01 23:22:05.649640412 [V:onnxruntime:, qnn_execution_provider.cc:1713 LogNodeSupport] Validation FAILED for 1 nodes in OrtNodeUnit (DequantizeLinear) :
\tOperator type: DequantizeLinear Node name: out_DequantizeLinear Node index: 723
\tREASON : QNN EP is configured to not take DQ nodes that generate a graph output.
"""


def test_failed_nodes_parses_the_eps_reasons() -> None:
    pytest.importorskip("onnx")
    from edgeship.exporters.qnn_coverage import failed_nodes

    got = failed_nodes(LOG)
    assert set(got) == {"val_58_DequantizeLinear", "node_Erf_55", "val_59_QuantizeLinear", "out_DequantizeLinear"}
    assert got["node_Erf_55"][0] == "Erf" and "`Erf` are not supported" in got["node_Erf_55"][1]
    assert got["out_DequantizeLinear"] == ("DequantizeLinear",
                                           "QNN EP is configured to not take DQ nodes that generate a graph output.")


def _graphs() -> tuple[object, object]:
    """A MatMul (2*1*4*8*16 = 1024 FLOPs) + Erf (8*16 = 128 elements) graph, and a 'compiled' one where Erf stayed."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 16), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Erf", ["y"], ["z"], name="erf")]
    src = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 16])], [w]))
    ctx_nodes = [helper.make_node("EPContext", ["x"], ["y"], name="part0", domain="com.microsoft"),
                 helper.make_node("Erf", ["y"], ["z"], name="erf")]
    ctx = helper.make_model(helper.make_graph(ctx_nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 16])]))
    return src, ctx


def test_coverage_counts_nodes_and_flops_where_the_ep_put_them() -> None:
    pytest.importorskip("onnx")
    from edgeship.exporters.qnn_coverage import NO_REASON, coverage

    src, ctx = _graphs()
    cov = coverage(src, ctx, {"erf": ("Erf", "Operators of type `Erf` are not supported by QNN EP.")}, 0.95)
    assert cov["nodes_total"] == 2 and cov["nodes_htp"] == 1 and cov["nodes_cpu"] == 1 and cov["partitions"] == 1
    assert cov["flops_total"] == 2 * 4 * 16 * 8 + 4 * 16 and cov["flops_cpu"] == 64
    assert cov["flops_share_htp"] == pytest.approx(1024 / 1088, abs=1e-6) and cov["passed"] is False  # 94.1% < 95%
    assert cov["fell_out"][0]["op_type"] == "Erf" and "not supported" in cov["fell_out"][0]["reason"]
    no_log = coverage(src, ctx, {}, 0.5)
    assert no_log["fell_out"][0]["reason"] == NO_REASON and no_log["passed"] is True


def test_mask_fill_and_shared_vectors_are_rewritten() -> None:
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgeship.exporters.onnx_npu import MASK_FILL, cap_mask_fill, unshare_vectors

    inits = [numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "fill"),
             numpy_helper.from_array(np.zeros(4, np.float32), "zeros")]
    nodes = [helper.make_node("Mul", ["x", "fill"], ["a"], name="mask"),
             helper.make_node("Add", ["a", "zeros"], ["b"], name="bias1"),
             helper.make_node("Add", ["b", "zeros"], ["c"], name="bias2")]
    vi = helper.make_tensor_value_info
    m = helper.make_model(helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [4])], [vi("c", TensorProto.FLOAT, [4])],
                                            inits))
    assert cap_mask_fill(m) == 1
    assert float(numpy_helper.to_array(m.graph.initializer[0])) == MASK_FILL
    assert unshare_vectors(m) == 1
    assert m.graph.node[1].input[1] == "zeros" and m.graph.node[2].input[1] != "zeros"
    assert len({i.name for i in m.graph.initializer}) == 3


def test_presence_on_x86_and_with_a_fastrpc_node(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime_qnn")
    monkeypatch.setattr(qnn.platform, "machine", lambda: "x86_64")
    p = qnn.htp_presence()
    assert not p.present and "no Hexagon NPU is present" in p.reason and "x86_64" in p.reason
    monkeypatch.setattr(qnn.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(qnn, "glob", lambda pattern: [])
    assert "no FastRPC device node" in qnn.htp_presence().reason
    monkeypatch.setattr(qnn, "glob", lambda pattern: ["/dev/fastrpc-cdsp"] if "fastrpc" in pattern else [])
    assert qnn.htp_presence().present


def test_presence_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    p = qnn.htp_presence()
    assert not p.present and "edgeship[npu]" in p.reason


def test_backend_refuses_without_an_npu_unless_simulating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime_qnn")
    monkeypatch.setattr(qnn.platform, "machine", lambda: "x86_64")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model")
    with pytest.raises(RuntimeMissingError, match="cannot run on the NPU.*--simulate-npu"):
        qnn.QnnBackend(model, options={"htp_arch": 75, "soc_model": 57})
    with pytest.raises(ArtifactLoadError, match="unknown runtime option"):
        qnn.QnnBackend(model, options={"htp_arch": 75, "soc_model": 57, "simulate": True, "turbo": 1})


def test_qnn_backend_module_is_torch_free() -> None:
    code = ("import sys\nfor n in ('torch', 'transformers', 'executorch'): sys.modules[n] = None\n"
            "from edgeship.profiling.backends import get_backend\n"
            "cls = get_backend('qnn')\nassert cls.format == 'qnn'\n"
            "from edgeship.profiling.backends.qnn import htp_presence\nprint(htp_presence().reason)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]


def test_profile_schema_rejects_a_bad_qnn_table(tmp_path: Path) -> None:
    from edgeship.targets import get_profile, load_profile_file
    from edgeship.targets.schema import PROFILE_DIR

    s24 = get_profile("galaxy-s24")
    assert s24.qnn is not None and (s24.qnn.htp_arch, s24.qnn.soc_model) == (75, 57)
    assert s24.qnn.min_flops_coverage == 0.95
    assert [r.installable_here for r in s24.preferred_backends("onnx")] == [True]
    assert get_profile("raspberry-pi-5").qnn is None
    base = (PROFILE_DIR / "galaxy-s24.toml").read_text().replace('name = "galaxy-s24"', 'name = "my-phone"')
    p = tmp_path / "p.toml"
    for old, new, match in (("htp_arch = 75", "htp_arch = 70", "htp_arch 70 is not a Hexagon HTP version"),
                            ('backend = "htp"', 'backend = "gpu"', "backend must be 'htp'"),
                            ("min_flops_coverage = 0.95", "min_flops_coverage = 1.5", r"must be in \[0, 1\]"),
                            ("soc_model = 57", "soc_model = 57, turbo = 1", "unknown key")):
        p.write_text(base.replace(old, new))
        with pytest.raises(ConfigError, match=match):
            load_profile_file(p)
