"""``edgeship profile B --inputs FILE``: the user's texts, arrays or images, prepared with the bundle's own files,
timed round-robin, latency by input length, and the artifacts' agreement on them."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeship.cli import main
from edgeship.errors import ConfigError, InputError, RuntimeMissingError
from edgeship.manifest import load_bundle
from edgeship.profiling import inputs as inputs_mod
from edgeship.profiling import report
from edgeship.profiling.inputs import bucket_of, read_inputs, tokenize
from edgeship.profiling.results import ArtifactResult, ProfileResult
from edgeship.profiling.runner import profile, reference_artifact

FAST = dict(runs=3, min_seconds=0.0, warmup=2, energy="off", idle_seconds=0.0, progress=False)
SHORT = ["the dog runs", "a red car", "happy sun", "the cat plays guitar", "rain"]  # 3-6 tokens with [CLS] [SEP]
LONG = [" ".join(["the quick brown fox jumps over the lazy dog"] * 5)]  # 45 words: 47 tokens
TOO_LONG = " ".join(["green tree"] * 200)  # 400 words, cut to the bundle's 128


def _read(path: Path, bundle: Path) -> inputs_mod.UserInputs:
    m = load_bundle(bundle, verify=False).manifest
    return read_inputs(path, m.inputs, m.preprocessing, bundle)


def _texts(tmp_path: Path, lines: list[str], name: str = "texts.txt") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tiny_vit_bundle(tiny_vit_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeship.pipeline import export

    out = tmp_path_factory.mktemp("bundles") / "tiny-vit"
    export(tiny_vit_dir, target="raspberry-pi-5", out=out, formats=["onnx"], recipes=["fp32"], log=lambda m: None)
    return out


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from PIL import Image

    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (64, 64), (17, 50)]):  # other sizes than the model's 32x32: resized
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


# ---- tokenization on the device equals the export side's ------------------------------------------------------
def _hf_tokenizer_json(tiny_onnx_bundle: Path, tmp_path: Path) -> Path:
    """The same bundle with the tokenizer.json that transformers' fast tokenizer writes for it."""
    from transformers import AutoTokenizer

    root = tmp_path / "bundle"
    (root / "tokenizer").mkdir(parents=True)
    AutoTokenizer.from_pretrained(tiny_onnx_bundle / "tokenizer").save_pretrained(root / "tokenizer")
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    return root


@pytest.mark.parametrize("files", ["vocab.txt", "tokenizer.json"])
def test_device_tokenization_equals_transformers(tiny_onnx_bundle: Path, tmp_path: Path, files: str) -> None:
    from transformers import AutoTokenizer

    pre = load_bundle(tiny_onnx_bundle, verify=False).manifest.preprocessing
    root = tiny_onnx_bundle if files == "vocab.txt" else _hf_tokenizer_json(tiny_onnx_bundle, tmp_path)
    assert (root / "tokenizer" / "tokenizer.json").is_file() == (files == "tokenizer.json")
    texts = [*SHORT, "The Dog, RUNS! fast.", TOO_LONG]
    ids, mask, types = tokenize(texts, pre, root)
    hf = AutoTokenizer.from_pretrained(tiny_onnx_bundle / "tokenizer")
    want = hf(texts, padding="max_length", truncation=True, max_length=pre["max_length"], return_tensors="np")
    assert ids.shape == (len(texts), pre["max_length"]) == (len(texts), 128)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    np.testing.assert_array_equal(types, want["token_type_ids"])
    assert mask[-1].sum() == 128 and mask[0].sum() == 5  # the long one cut to max_length, the short one padded


@pytest.mark.slow
def test_device_tokenization_equals_transformers_on_minilm(minilm_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    shutil.copytree(minilm_dir, tmp_path / "tokenizer")  # the bundle's layout: its tokenizer files under tokenizer/
    pre = {"kind": "tokenizer", "max_length": 128, "tokenizer_class": "BertTokenizer", "lowercase": True}
    texts = ["A man is playing a guitar.", "Héllo wörld — ünïcode", TOO_LONG]
    ids, mask, _ = tokenize(texts, pre, tmp_path)
    want = AutoTokenizer.from_pretrained(minilm_dir)(texts, padding="max_length", truncation=True, max_length=128,
                                                     return_tensors="np")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])


# ---- texts, arrays, images -------------------------------------------------------------------------------------
def test_txt_jsonl_and_npz_give_the_same_inputs(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    txt = _read(_texts(tmp_path, ["", *SHORT, "  ", *LONG]), tiny_onnx_bundle)  # blank lines are skipped
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate([*SHORT, *LONG])))
    js = _read(jsonl, tiny_onnx_bundle)
    assert (txt.kind, js.kind, txt.count, js.count) == ("txt", "jsonl", 6, 6)
    assert txt.lengths == js.lengths == (5, 5, 4, 6, 3, 47)
    arrays = {k: np.concatenate([f[k] for f in txt.feeds]).astype(np.int32) for k in txt.feeds[0]}  # int32: cast
    np.savez(tmp_path / "ids.npz", **arrays)  # type: ignore[arg-type]
    npz = _read(tmp_path / "ids.npz", tiny_onnx_bundle)
    assert npz.kind == "npz" and npz.lengths == txt.lengths
    for a, b, c in zip(txt.feeds, js.feeds, npz.feeds, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a[k], c[k])
            assert a[k].dtype == c[k].dtype == np.int64 and a[k].shape == (1, 128)
    assert txt.sha256 != js.sha256 and len(txt.sha256) == 64


def test_buckets_by_real_tokens() -> None:
    assert [bucket_of(n) for n in (1, 16, 17, 32, 33, 64, 65, 128, 129)] == [
        (1, 16), (1, 16), (17, 32), (17, 32), (33, 64), (33, 64), (65, 128), (65, 128), (129, 256)]


def test_profile_on_the_users_texts(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    texts = _texts(tmp_path, [*SHORT, *LONG])
    res = profile(tiny_onnx_bundle, inputs=str(texts), json_path=tmp_path / "r.json", **FAST)
    fp32, int8 = (next(r for r in res.results if r.artifact == k) for k in ("onnx/fp32", "onnx/int8-dynamic"))
    for r in (fp32, int8):
        assert r.ok, r.error
        assert r.torch_free  # tokenized on the device side, torch unimportable
        u = r.user_inputs
        assert u is not None and (u.name, u.kind, u.count) == ("texts.txt", "txt", 6)
        assert len(r.samples_ns) % 6 == 0 and len(r.samples_ns) >= 6  # whole rounds, whatever --runs says
        rounds = len(r.samples_ns) // 6
        assert [b.label for b in u.buckets] == ["1-16 tokens", "33-64 tokens"]
        assert [(b.inputs, b.runs) for b in u.buckets] == [(5, 5 * rounds), (1, rounds)]
        assert sum(b.runs for b in u.buckets) == len(r.samples_ns)
        assert all(0 < b.p50_ms <= b.p90_ms for b in u.buckets)
        assert r.input is not None and "your inputs texts.txt" in str(r.input.source)
        assert r.device_check is not None  # the held-out check against PyTorch still runs
        assert u.prepared_mb == pytest.approx(6 * 2 * 128 * 8 / 2**20)  # 6 x input_ids + attention_mask, int64
    assert fp32.user_inputs and fp32.user_inputs.agreement is None
    assert "reference" in str(fp32.user_inputs.agreement_note)
    a = int8.user_inputs.agreement if int8.user_inputs else None
    assert a is not None and a.n_samples == 6 and 0.5 < a.min_cosine <= a.mean_cosine <= 1.0 + 1e-9
    assert int8.user_inputs and int8.user_inputs.agreement_vs == "onnx/fp32"
    assert "not against PyTorch" in str(int8.user_inputs.agreement_note)

    back = ProfileResult.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert back.results == res.results
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["user_inputs"]["sha256"] == \
        hashlib.sha256(texts.read_bytes()).hexdigest()
    old = {k: v for k, v in int8.to_dict().items() if k != "user_inputs"}  # a results file from before --inputs
    assert ArtifactResult.from_dict(old).user_inputs is None
    text = report.render(res)
    assert "latency by input length on texts.txt (txt, 6 inputs" in text and "33-64 tokens" in text
    assert "against onnx/fp32, not against PyTorch" in text
    assert "peak MB includes the 6 prepared inputs (0.0 MB), held in memory for the round-robin with the tokenizer" \
        in text


def test_without_fp32_in_the_run_there_is_no_agreement(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    res = profile(tiny_onnx_bundle, artifact="onnx/int8-dynamic", inputs=str(_texts(tmp_path, SHORT)),
                  **{**FAST, "runs": 7})
    (r,) = res.results
    assert len(r.samples_ns) == 10  # --runs 7 on 5 inputs: rounded up to whole rounds
    assert r.ok and r.user_inputs and r.user_inputs.agreement is None
    assert "no fp32 artifact" in str(r.user_inputs.agreement_note)


def test_image_folder_on_an_image_bundle(tiny_vit_bundle: Path, images: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image
    from transformers import ViTImageProcessor

    user = _read(images, tiny_vit_bundle)
    assert (user.kind, user.count, user.lengths) == ("images", 3, None)
    proc = ViTImageProcessor.from_pretrained(tiny_vit_bundle / "preprocessor")  # the processor the model came with
    for f, feeds in zip(sorted(images.iterdir()), user.feeds, strict=True):
        want = proc(Image.open(f).convert("RGB"), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(feeds["pixel_values"], want, atol=1e-5)
    assert main(["profile", str(tiny_vit_bundle), "--inputs", str(images), "--runs", "3", "--min-seconds", "0",
                 "--warmup", "1", "--energy", "off", "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "latency by input length on photos (images, 3 inputs" in out and "all inputs" in out
    (r,) = ProfileResult.from_dict(json.loads((tmp_path / "r.json").read_text())).results
    assert r.user_inputs and [(b.label, b.inputs) for b in r.user_inputs.buckets] == [("all inputs", 3)]


# ---- every bad input is one line -------------------------------------------------------------------------------
def _bad(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(("name", "data", "match"), [
    ("empty.txt", b"\n  \n\n", "empty; give at least one input"),
    ("latin1.txt", b"the dog\ncaf\xe9\n", r"latin1.txt:2: not UTF-8"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', r"broken.jsonl:2: not JSON"),
    ("notext.jsonl", b'{"text": "a"}\n\n{"label": 1}\n', r"notext.jsonl:3: no \"text\" string field"),
    ("number.jsonl", b'{"text": 5}\n', r"number.jsonl:1: no \"text\""),
    ("texts.csv", b"a,b\n", "unknown kind of file; give a .txt"),
    ("ids.npz", b"not a zip", "not a readable .npz"),
])
def test_bad_text_files(tiny_onnx_bundle: Path, tmp_path: Path, name: str, data: bytes, match: str) -> None:
    with pytest.raises(InputError, match=match):
        _read(_bad(tmp_path, name, data), tiny_onnx_bundle)


def test_too_many_inputs(tiny_onnx_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs_mod, "MAX_INPUTS", 4)
    assert _read(_texts(tmp_path, SHORT[:4]), tiny_onnx_bundle).count == 4
    with pytest.raises(InputError, match="5 inputs, at most 4; profile a sample"):
        _read(_texts(tmp_path, SHORT), tiny_onnx_bundle)


@pytest.mark.parametrize(("arrays", "match"), [
    ({"input_ids": np.zeros((2, 128), np.int64)}, "arrays named input_ids, the model takes"),
    ({"input_ids": np.zeros((2, 128), np.float32), "attention_mask": np.ones((2, 128), np.int64)},
     "'input_ids' is float32, the input is int64"),
    ({"input_ids": np.zeros((2, 128), np.int64), "attention_mask": np.ones((3, 128), np.int64)},
     "different numbers of inputs"),
    ({"input_ids": np.zeros((128,), np.int64), "attention_mask": np.ones((128,), np.int64)}, "is 1-D"),
    ({"input_ids": np.zeros((0, 128), np.int64), "attention_mask": np.ones((0, 128), np.int64)}, "empty"),
])
def test_bad_npz(tiny_onnx_bundle: Path, tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    np.savez(tmp_path / "x.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=match):
        _read(tmp_path / "x.npz", tiny_onnx_bundle)


def test_bad_npz_for_an_image_bundle(tiny_vit_bundle: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", pixel_values=np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(InputError, match="has 16 on axis 2, the input needs 32"):
        _read(tmp_path / "x.npz", tiny_vit_bundle)
    np.savez(tmp_path / "ok.npz", pixel_values=np.zeros((2, 3, 32, 32), np.float64))  # float64: same kind, cast
    assert _read(tmp_path / "ok.npz", tiny_vit_bundle).feeds[1]["pixel_values"].dtype == np.float32


def test_wrong_kind_for_the_bundle(tiny_onnx_bundle: Path, tiny_vit_bundle: Path, images: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="texts, but this bundle's model takes pixel_values .* give a folder of images"):
        _read(_texts(tmp_path, SHORT), tiny_vit_bundle)
    with pytest.raises(InputError, match="a folder is read as images, but this bundle's model takes input_ids"):
        _read(images, tiny_onnx_bundle)
    with pytest.raises(InputError, match="no such file or folder"):
        _read(tmp_path / "nope.txt", tiny_onnx_bundle)


def test_prepared_inputs_must_fit_in_memory(tiny_vit_bundle: Path, images: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs_mod, "MAX_PREPARED_BYTES", 2 * 3 * 32 * 32 * 4)  # two 32x32 RGB float32 images
    with pytest.raises(InputError, match="3 inputs of 0.0 MB each would take .* give at most 2"):
        _read(images, tiny_vit_bundle)


def test_bad_images(tiny_vit_bundle: Path, images: Path) -> None:
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match=r"broken.jpg: cannot decode the image"):
        _read(images, tiny_vit_bundle)
    (images / "broken.jpg").unlink()
    (images / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="notes.txt is not an image"):
        _read(images, tiny_vit_bundle)
    (images / "notes.txt").unlink()
    (images / ".DS_Store").write_bytes(b"\0")  # hidden files are not inputs
    assert _read(images, tiny_vit_bundle).count == 3
    for f in images.iterdir():
        f.unlink()
    with pytest.raises(InputError, match="empty"):
        _read(images, tiny_vit_bundle)


def test_missing_packages_say_which_extra(tiny_onnx_bundle: Path, tiny_vit_bundle: Path, images: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(RuntimeMissingError, match=r"image inputs need Pillow: pip install 'edgeship\[inputs\]'"):
        _read(images, tiny_vit_bundle)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(RuntimeMissingError, match=r"need the tokenizers package"):
        _read(_texts(tmp_path, SHORT), tiny_onnx_bundle)


def test_inputs_need_a_bundle_and_no_shape(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    texts = str(_texts(tmp_path, SHORT))
    with pytest.raises(ConfigError, match="--inputs needs a bundle"):
        profile(tiny_onnx_bundle / "onnx" / "fp32.onnx", inputs=texts, **FAST)
    with pytest.raises(ConfigError, match="--inputs and --shape exclude each other"):
        profile(tiny_onnx_bundle, inputs=texts, shapes={"input_ids": (1, 16)}, **FAST)


def test_a_bad_file_on_the_command_line_is_one_line_before_any_run(
        tiny_onnx_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad(tmp_path, "t.jsonl", b'{"text": "ok"}\n{"txt": "typo"}\n')
    assert main(["profile", str(tiny_onnx_bundle), "--inputs", str(bad), "--quiet"]) != 0
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert "t.jsonl:2: no \"text\" string field" in err and "\n" not in err and "Traceback" not in err
    assert "onnx/fp32" not in cap.out  # refused before any artifact was measured


def test_html_report_names_the_inputs(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    from edgeship.profiling.html import render_html
    from edgeship.profiling.results import DeviceRun

    res = profile(tiny_onnx_bundle, inputs=str(_texts(tmp_path, [*SHORT, *LONG])), **FAST)
    page = render_html([DeviceRun(res)])
    assert "<h2>Your inputs</h2>" in page and "texts.txt (txt, 6 inputs" in page
    assert "33-64 tokens" in page and "vs onnx/fp32" in page and "not with PyTorch" in page
    assert "<h2>Your inputs</h2>" not in render_html([DeviceRun(profile(tiny_onnx_bundle, artifact="onnx/fp32",
                                                                        **FAST))])


def test_inputs_on_an_llm_bundle_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    llm = tmp_path / "llm-bundle"
    llm.mkdir()
    (llm / "manifest.json").write_text(json.dumps({"llm": {}}))  # what marks a decoder-LLM bundle
    assert main(["profile", str(llm), "--inputs", str(_texts(tmp_path, SHORT)), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "an LLM bundle is timed by --prompt-lengths" in err and "\n" not in err


@pytest.mark.needs_export
def test_texts_on_litert_and_executorch(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                                        tmp_path: Path) -> None:
    """The static-shape formats take the same prepared inputs (LiteRT's int32 ids through its adapt_feeds), and
    are compared with the ONNX fp32 artifact of the same run."""
    from edgeship.pipeline import export

    out = tmp_path_factory.mktemp("bundles") / "tiny-3"
    export(tiny_bert_dir, target="raspberry-pi-5", out=out, formats=["onnx", "tflite", "pte"], recipes=["fp32"],
           log=lambda m: None)
    res = profile(out, inputs=str(_texts(tmp_path, [*SHORT, *LONG])), **FAST)
    assert reference_artifact(res.results) is not None and reference_artifact(res.results).artifact == "onnx/fp32"
    for r in res.results:
        assert r.ok and r.user_inputs is not None, r.error
        assert [(b.label, b.inputs) for b in r.user_inputs.buckets] == [("1-16 tokens", 5), ("33-64 tokens", 1)]
        if r.artifact != "onnx/fp32":
            a = r.user_inputs.agreement
            assert a is not None and r.user_inputs.agreement_vs == "onnx/fp32" and a.min_cosine > 0.999  # all fp32


def test_prepared_inputs_read_back_as_the_users_file(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    """What a remote run sends: the host's prepared arrays, still named after the user's file."""
    from edgeship.profiling.inputs import write_prepared

    user = _read(_texts(tmp_path, [*SHORT, *LONG]), tiny_onnx_bundle)
    write_prepared(user, tmp_path / "prepared.npz")
    back = _read(tmp_path / "prepared.npz", tiny_onnx_bundle)
    assert (back.name, back.kind, back.sha256, back.lengths) == (user.name, user.kind, user.sha256, user.lengths)
    assert back.prepared_on == "host" and user.prepared_on == "device"
    assert "prepared on the host" in back.describe() and "prepared" not in user.describe()
    for a, b in zip(user.feeds, back.feeds, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
