"""The user's own inputs for ``edgeship profile B --inputs FILE``, prepared with the bundle's own files.

Texts (``.txt`` one per line, ``.jsonl`` with a ``"text"`` field) go through the bundle's tokenizer
(``tokenizer/tokenizer.json``, or a BERT ``vocab.txt``) with the ``tokenizers`` package, the way the export
side's Hugging Face tokenizer did it: truncation and padding to the manifest's ``max_length``. Arrays
(``.npz``) are keyed by the bundle's input names, one input per row of the leading axis. An image folder
is decoded with Pillow and resized / rescaled / normalised per the manifest's ``preprocessing``.
Torch-free: this runs on the device.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import ConfigError, InputError, RuntimeMissingError
from edgeship.profiling.results import LengthBucket
from edgeship.spec import TensorSpec

MAX_INPUTS = 10_000  # more is a data set, not a latency profile; the timed loop runs each at least once
MAX_PREPARED_BYTES = 1 << 30  # every prepared input stays in memory for the round-robin (10,000 224px images: 6 GB)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEXT_SUFFIXES = (".txt", ".jsonl")
PREPARED_KEY = "__edgeship_inputs__"  # in a .npz of prepared inputs: the user's file it was made from (JSON bytes)
Feeds = dict[str, np.ndarray]


def _sha256(data: bytes = b"") -> Any:
    import hashlib  # only with --inputs: OpenSSL is 3.5 MB of every other worker's RSS

    return hashlib.sha256(data)


@dataclass(frozen=True)
class UserInputs:
    """The inputs of one ``--inputs`` file, batch 1 each, in file order."""

    name: str  # the file or folder name (results name their inputs by it and its sha256)
    kind: str  # "txt", "jsonl", "npz" or "images"
    sha256: str  # of the file; of a folder, over its image names and bytes
    feeds: tuple[Feeds, ...]
    lengths: tuple[int, ...] | None  # real (non-padding) tokens per input; None where length means nothing
    prepared_on: str = "device"  # "host": tokenized / decoded by the host of a remote run (:func:`write_prepared`)

    @property
    def count(self) -> int:
        return len(self.feeds)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for f in self.feeds for v in f.values())

    def describe(self) -> str:
        """'texts.jsonl (jsonl, 200 inputs, sha256 1a2b3c4d5e6f)', as the result's ``user_inputs`` says it."""
        where = ", prepared on the host" if self.prepared_on == "host" else ""
        return f"{self.name} ({self.kind}, {self.count} inputs, sha256 {self.sha256[:12]}{where})"


def check_usable(has_bundle: bool, shapes: Mapping[str, Any]) -> None:
    """--inputs goes with a bundle (a bare model file has no tokenizer or preprocessing) and without --shape."""
    if not has_bundle:
        raise ConfigError("--inputs needs a bundle: its manifest says how to tokenize or preprocess them and which "
                          "inputs the model takes (a bare model file has neither)")
    if shapes:
        raise ConfigError("--inputs and --shape exclude each other: the inputs fix the shapes")


def read_inputs(path: str | Path, specs: Sequence[TensorSpec], preprocessing: Mapping[str, Any],
                root: Path) -> UserInputs:
    """``path`` prepared for a bundle whose inputs are ``specs`` and whose files are under ``root``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"--inputs {p}: no such file or folder")
    kind = str(preprocessing.get("kind") or "none")
    if p.is_dir():
        if kind != "image":
            raise InputError(f"--inputs {p}: a folder is read as images, but this bundle's model takes "
                             f"{_takes(specs)}; give {_what_fits(kind)}")
        return _images(p, specs, preprocessing)
    if p.suffix in TEXT_SUFFIXES:
        if kind != "tokenizer":
            raise InputError(f"--inputs {p}: texts, but this bundle's model takes {_takes(specs)}; "
                             f"give {_what_fits(kind)}")
        texts, digest = _read_texts(p)
        ids, mask, types = tokenize(texts, preprocessing, root)
        return UserInputs(p.name, p.suffix[1:], digest, _text_feeds(specs, ids, mask, types),
                          tuple(int(n) for n in mask.sum(axis=1)))
    if p.suffix == ".npz":
        return _arrays(p, specs)
    raise InputError(f"--inputs {p}: unknown kind of file; give {_what_fits(kind)}")


def _takes(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in specs)


def _what_fits(kind: str) -> str:
    if kind == "tokenizer":
        return "a .txt (one text per line) or .jsonl (a \"text\" field per line) file, or a .npz of its inputs"
    if kind == "image":
        return "a folder of images (" + " ".join(IMAGE_SUFFIXES) + ") or a .npz of its inputs"
    return "a .npz file with one array per input name"


def _count(p: Path, n: int, each_bytes: int = 0) -> None:
    if n == 0:
        raise InputError(f"--inputs {p}: empty; give at least one input")
    if n > MAX_INPUTS:
        raise InputError(f"--inputs {p}: {n:,} inputs, at most {MAX_INPUTS:,}; profile a sample of them")
    if n * each_bytes > MAX_PREPARED_BYTES:
        raise InputError(f"--inputs {p}: {n:,} inputs of {each_bytes / 2**20:.1f} MB each would take "
                         f"{n * each_bytes / 2**30:.1f} GB in memory, at most {MAX_PREPARED_BYTES / 2**30:.0f} GB; "
                         f"give at most {MAX_PREPARED_BYTES // each_bytes:,}")


# ---- texts ---------------------------------------------------------------------------------------------------
def _read_texts(p: Path) -> tuple[list[str], str]:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"--inputs {p}: cannot read it ({e.strerror})") from None
    texts: list[str] = []
    for i, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InputError(f"--inputs {p}:{i}: not UTF-8 text; save the file as UTF-8") from None
        if not text:
            continue  # blank lines separate nothing: skipped, as the calibration reader does
        if p.suffix == ".jsonl":
            text = _jsonl_text(p, i, text)
        texts.append(text)
    _count(p, len(texts))
    return texts, _sha256(raw).hexdigest()


def _jsonl_text(p: Path, line_no: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"--inputs {p}:{line_no}: not JSON ({e.msg}); each line is an object with a \"text\" "
                         "field") from None
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise InputError(f"--inputs {p}:{line_no}: no \"text\" string field; each line is an object like "
                         "{\"text\": \"...\"}")
    return text


def tokenize(texts: Sequence[str], preprocessing: Mapping[str, Any], root: Path
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask and token_type_ids (N x max_length int64) as the export side made them."""
    tok = bundle_tokenizer(preprocessing, root)
    enc = tok.encode_batch(list(texts))
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    types = np.array([e.type_ids for e in enc], dtype=np.int64)
    return ids, mask, types


def bundle_tokenizer(preprocessing: Mapping[str, Any], root: Path) -> Any:
    """A ``tokenizers.Tokenizer`` from the bundle's files, truncating and padding to the manifest's max_length."""
    try:
        import tokenizers
    except ImportError:
        raise RuntimeMissingError("text inputs need the tokenizers package: pip install 'edgeship[inputs]'") from None
    d = root / "tokenizer"
    cfg = _json(d / "tokenizer_config.json") | _json(d / "special_tokens_map.json")
    if (d / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    elif (d / "vocab.txt").is_file() and "Bert" in str(preprocessing.get("tokenizer_class") or "Bert"):
        # what transformers' converter builds for a BertTokenizer from its vocab.txt
        tok = tokenizers.BertWordPieceTokenizer(str(d / "vocab.txt"), lowercase=bool(preprocessing.get("lowercase")))
    else:
        raise InputError(f"{d}: no tokenizer.json (or BERT vocab.txt) in the bundle, so texts cannot be tokenized "
                         "on the device; give a .npz of token ids instead")
    max_length = int(preprocessing.get("max_length") or 0)
    if max_length < 1:
        raise InputError("the bundle's preprocessing has no max_length; give a .npz of token ids instead")
    pad = _token_text(cfg.get("pad_token")) or (tok.padding or {}).get("pad_token") or "[PAD]"
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise InputError(f"{d}: the padding token {pad!r} is not in the vocabulary; give a .npz of token ids instead")
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad)
    return tok


def _json(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: unreadable ({e})") from None
    return d if isinstance(d, dict) else {}


def _token_text(t: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(t, dict):
        t = t.get("content")
    return t if isinstance(t, str) else None


def _text_feeds(specs: Sequence[TensorSpec], ids: np.ndarray, mask: np.ndarray, types: np.ndarray
                ) -> tuple[Feeds, ...]:
    made = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    missing = [s.name for s in specs if s.name not in made]
    if missing:
        raise InputError(f"the tokenizer makes input_ids, attention_mask and token_type_ids, but the model also "
                         f"takes {', '.join(missing)}; give a .npz of all its inputs instead")
    return tuple({s.name: made[s.name][i:i + 1].astype(s.dtype) for s in specs} for i in range(ids.shape[0]))


# ---- arrays ----------------------------------------------------------------------------------------------------
def write_prepared(user: UserInputs, path: Path) -> None:
    """The prepared inputs as a .npz that :func:`read_inputs` reads back as the same inputs, still named after the
    user's file. A remote run sends this: the device then needs neither tokenizers (whose wheel pulls in
    huggingface-hub and its dependencies) nor Pillow, and times exactly the arrays the host made."""
    arrays = {k: np.concatenate([f[k] for f in user.feeds]) for k in user.feeds[0]}
    meta = {"name": user.name, "kind": user.kind, "sha256": user.sha256}
    arrays[PREPARED_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def _arrays(p: Path, specs: Sequence[TensorSpec]) -> UserInputs:
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop(PREPARED_KEY).tobytes()) if PREPARED_KEY in arrays else None
    except Exception as e:  # numpy raises OSError, ValueError, BadZipFile... for a broken file
        raise InputError(f"--inputs {p}: not a readable .npz ({type(e).__name__}: {e})") from None
    want = {s.name for s in specs}
    if set(arrays) != want:
        raise InputError(f"--inputs {p}: arrays named {', '.join(sorted(arrays)) or '(none)'}, the model takes "
                         f"{_takes(specs)}; name one array per input, the leading axis counting the inputs")
    n = {k: v.shape[0] if v.ndim else -1 for k, v in arrays.items()}
    if len(set(n.values())) != 1:
        raise InputError(f"--inputs {p}: the arrays hold different numbers of inputs ({n}); the leading axis "
                         "counts the inputs and must agree")
    out = {s.name: _checked(p, s, arrays[s.name]) for s in specs}
    count = next(iter(n.values()))
    _count(p, count, sum(v[:1].nbytes for v in out.values()))
    lengths = tuple(int(x) for x in out["attention_mask"].reshape(count, -1).sum(axis=1)) \
        if "attention_mask" in out else None
    feeds = tuple({k: v[i:i + 1] for k, v in out.items()} for i in range(count))
    if isinstance(meta, dict):  # made by write_prepared: the user's own file is what the results name
        return UserInputs(str(meta.get("name")), str(meta.get("kind")), str(meta.get("sha256")), feeds, lengths, "host")
    return UserInputs(p.name, "npz", _sha256_file(p), feeds, lengths)


def _checked(p: Path, s: TensorSpec, a: np.ndarray) -> np.ndarray:
    where = f"--inputs {p}: array '{s.name}'"
    if a.ndim != len(s.shape):
        raise InputError(f"{where} is {a.ndim}-D {list(a.shape)}, the input is {list(s.shape)} (the leading axis "
                         "counts the inputs)")
    for i, (d, g) in enumerate(zip(s.shape[1:], a.shape[1:], strict=True), 1):
        if isinstance(d, int) and d != g:
            raise InputError(f"{where} has {g} on axis {i}, the input needs {d} ({list(s.shape)})")
    if a.dtype == np.dtype(s.dtype):
        return a
    if a.dtype.kind in "biuf" and np.can_cast(a.dtype, s.dtype, "same_kind") and a.dtype.kind == np.dtype(s.dtype).kind:
        return a.astype(s.dtype)  # int32 ids for an int64 input, float64 pixels for float32: same kind of number
    raise InputError(f"{where} is {a.dtype}, the input is {s.dtype}; save it as {s.dtype}")


def _sha256_file(p: Path) -> str:
    h = _sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- images ----------------------------------------------------------------------------------------------------
def _images(folder: Path, specs: Sequence[TensorSpec], pre: Mapping[str, Any]) -> UserInputs:
    try:
        files = sorted(f for f in folder.iterdir() if not f.name.startswith("."))
    except OSError as e:
        raise InputError(f"--inputs {folder}: cannot list the folder ({e.strerror})") from None
    for f in files:
        if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"--inputs {folder}: {f.name} is not an image ({' '.join(IMAGE_SUFFIXES)}); "
                             "the folder must hold only images")
    if len(specs) != 1:
        raise InputError(f"--inputs {folder}: images feed one input, the model takes {_takes(specs)}; give a .npz")
    spec = specs[0]
    channels, height, width = _image_size(spec, pre)
    _count(folder, len(files), channels * height * width * np.dtype(spec.dtype).itemsize)
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeMissingError("image inputs need Pillow: pip install 'edgeship[inputs]'") from None
    h = _sha256()
    feeds = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise InputError(f"--inputs {f}: cannot read it ({e.strerror})") from None
        h.update(f.name.encode() + b"\0" + _sha256(data).digest())
        arr = _pixels(f, Image, channels, (width, height), pre)
        feeds.append({spec.name: np.ascontiguousarray(arr.transpose(2, 0, 1) if pre.get("channels_first", True)
                                                      else arr)[None].astype(spec.dtype)})
    return UserInputs(folder.name, "images", h.hexdigest(), tuple(feeds), None)


def _image_size(spec: TensorSpec, pre: Mapping[str, Any]) -> tuple[int, int, int]:
    """Channels, height and width of the model's image input (NCHW, or NHWC without ``channels_first``)."""
    if len(spec.shape) != 4:
        raise InputError(f"input '{spec.name}' {list(spec.shape)} is not an image batch (4-D); give a .npz")
    c, hh, ww = spec.shape[1:] if pre.get("channels_first", True) else (spec.shape[3], *spec.shape[1:3])
    raw_size = pre.get("size")
    size: Mapping[str, Any] = raw_size if isinstance(raw_size, Mapping) else {}
    height, width = (hh if isinstance(hh, int) else size.get("height")), (ww if isinstance(ww, int) else size.get("width"))
    if not all(isinstance(x, int) for x in (c, height, width)):
        raise InputError(f"input '{spec.name}' {list(spec.shape)}: the bundle fixes no image size; give a .npz")
    return int(c), int(height), int(width)  # type: ignore[arg-type]


def _pixels(f: Path, image_mod: Any, channels: int, size: tuple[int, int], pre: Mapping[str, Any]) -> np.ndarray:
    """One image, HWC float, as a ViT-style image processor makes it: resized straight to the model's size
    (bilinear), rescaled, normalised. Processors that resize the shortest edge and centre-crop are not
    reproduced: the manifest records no crop."""
    try:
        with image_mod.open(f) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize(size, image_mod.Resampling.BILINEAR)
            arr: np.ndarray = np.asarray(im, dtype=np.float32)
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError... for a broken file
        raise InputError(f"--inputs {f}: cannot decode the image ({type(e).__name__}: {e})") from None
    arr = arr[..., None] if arr.ndim == 2 else arr
    arr = arr * np.float32(pre.get("rescale_factor") or 1 / 255)
    if pre.get("mean") is not None and pre.get("std") is not None:
        arr = (arr - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return arr


# ---- latency by input length -----------------------------------------------------------------------------------
def bucket_of(n: int) -> tuple[int, int]:
    """1-16, 17-32, 33-64, 65-128...: real token counts grouped by the power of two above them."""
    hi = 16
    while n > hi:
        hi *= 2
    return (min(n, 1) if hi == 16 else hi // 2 + 1), hi


def length_buckets(samples_ns: Sequence[int], inputs: UserInputs) -> tuple[LengthBucket, ...]:
    """p50/p90 of the timed runs per length bucket; timed run ``i`` ran input ``i % inputs.count``."""
    runs: dict[tuple[int, int] | None, list[int]] = {}
    seen: dict[tuple[int, int] | None, set[int]] = {}
    for i, ns in enumerate(samples_ns):
        j = i % inputs.count
        key = bucket_of(inputs.lengths[j]) if inputs.lengths is not None else None
        runs.setdefault(key, []).append(ns)
        seen.setdefault(key, set()).add(j)
    out = []
    for key in sorted(runs, key=lambda k: k or (0, 0)):
        ms = np.asarray(runs[key], dtype=np.float64) / 1e6
        label = f"{key[0]}-{key[1]} tokens" if key else "all inputs"
        out.append(LengthBucket(label, key[0] if key else None, key[1] if key else None, len(seen[key]), len(ms),
                                float(np.percentile(ms, 50)), float(np.percentile(ms, 90))))
    return tuple(out)
