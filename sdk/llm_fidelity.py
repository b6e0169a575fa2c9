"""Fidelity of a decoder-LLM artifact: does it still say what the PyTorch fp32 model says?

Measured through the device runtime (:class:`~edgeship.profiling.llm.runtime.LLMRuntime`) on held-out text and
prompts that the bundle keeps, so ``edgeship profile`` can repeat the check on the device:

- teacher-forced: both read the same >= 256 tokens; per position, next-token top-1 agreement, KL(PyTorch ||
  artifact), and each one's perplexity of the text;
- greedy: each prompt is continued for ``new_tokens`` tokens by both (EOS ignored, so every prompt compares the
  same number of tokens); we keep the index of the first token that differs.

The reference side (:func:`torch_reference`) imports torch inside; :func:`measure` is numpy only.
:func:`measure_as_on_device` runs it in a fresh process with torch blocked (``python -m edgeship.llm_fidelity``),
for a runtime whose kernels depend on the process (:attr:`~edgeship.profiling.llm.runtime.LLMRuntime.
kernels_follow_process`): the figures kept are then the ones a device gets.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import ExportError
from edgeship.manifest import LLMFidelity

MIN_TEXT_TOKENS = 256


@dataclass(frozen=True)
class LLMReference:
    """PyTorch fp32's view of the held-out text and prompts."""

    text_ids: tuple[int, ...]  # n + 1 tokens: positions 0..n-1 predict 1..n
    logprobs: np.ndarray  # [n, vocab] float32 log-softmax of the next-token logits at positions 0..n-1
    prompt_ids: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[int, ...], ...]  # greedy tokens after each prompt
    new_tokens: int

    @property
    def n_tokens(self) -> int:
        return int(self.logprobs.shape[0])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def torch_reference(model: Any, text_ids: Sequence[int], prompt_ids: Sequence[Sequence[int]],
                    new_tokens: int) -> LLMReference:
    import torch

    with torch.inference_mode():
        ids = torch.tensor([list(text_ids)], dtype=torch.long)
        logits = model(input_ids=ids[:, :-1]).logits[0].float().numpy()
        conts = []
        for p in prompt_ids:
            out = model(input_ids=torch.tensor([list(p)], dtype=torch.long), use_cache=True)
            past, toks = out.past_key_values, []
            for _ in range(new_tokens):
                nxt = int(out.logits[0, -1].argmax())
                toks.append(nxt)
                out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=past, use_cache=True)
                past = out.past_key_values
            conts.append(tuple(toks))
    return LLMReference(text_ids=tuple(int(i) for i in text_ids), logprobs=_log_softmax(logits).astype(np.float32),
                        prompt_ids=tuple(tuple(int(i) for i in p) for p in prompt_ids),
                        continuations=tuple(conts), new_tokens=new_tokens)


def greedy(runtime: Any, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy continuation through an :class:`LLMRuntime` (EOS not special: fixed length)."""
    runtime.reset()
    logits = runtime.append(list(prompt))
    out: list[int] = []
    for i in range(new_tokens):
        nxt = int(np.argmax(logits))
        out.append(nxt)
        if i + 1 < new_tokens:
            logits = runtime.append([nxt])
    return out


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure(runtime: Any, ref: LLMReference, floor_top1: float) -> LLMFidelity:
    """Run the held-out text and prompts through ``runtime`` and compare with ``ref``."""
    runtime.reset()
    n = ref.n_tokens
    agree, kl_sum, nll_art, nll_ref = 0, 0.0, 0.0, 0.0
    for i in range(n):
        # one token at a time: the protocol returns the last position's logits, and this is the decode path
        q = _log_softmax(runtime.append([ref.text_ids[i]]))
        p = ref.logprobs[i].astype(np.float64)
        agree += int(np.argmax(q) == np.argmax(p))
        kl_sum += float(np.sum(np.exp(p) * (p - q)))
        nxt = ref.text_ids[i + 1]
        nll_art -= float(q[nxt])
        nll_ref -= float(p[nxt])
    divs = tuple(first_divergence(ref_c, greedy(runtime, prompt, ref.new_tokens))
                 for prompt, ref_c in zip(ref.prompt_ids, ref.continuations, strict=True))
    top1 = agree / n
    return LLMFidelity(
        n_tokens=n, top1_agreement=round(top1, 6), mean_kl=round(max(kl_sum / n, 0.0), 6),
        perplexity=round(float(np.exp(nll_art / n)), 4), perplexity_reference=round(float(np.exp(nll_ref / n)), 4),
        n_prompts=len(divs), new_tokens=ref.new_tokens, greedy_identical=sum(d is None for d in divs),
        first_divergence=divs, floor_top1_agreement=floor_top1, passed=top1 >= floor_top1)


# ---- the same measurement in a process that runs like a device's ---------------------------------------------
MEASURE_TIMEOUT_S = 1800.0


def save_reference(ref: LLMReference, path: Path) -> Path:
    """``ref`` as one ``.npz`` (no pickles), for :func:`measure_as_on_device`; written once per export."""
    rest = {"prompt_ids": ref.prompt_ids, "continuations": ref.continuations, "new_tokens": ref.new_tokens}
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, text_ids=np.asarray(ref.text_ids, dtype=np.int64), logprobs=ref.logprobs,
             rest=np.asarray(json.dumps(rest)))
    tmp.replace(path)
    return path


def load_reference(path: Path) -> LLMReference:
    with np.load(path, allow_pickle=False) as z:
        rest = json.loads(str(z["rest"]))
        return LLMReference(text_ids=tuple(int(i) for i in z["text_ids"]), logprobs=np.asarray(z["logprobs"]),
                            prompt_ids=tuple(tuple(int(i) for i in p) for p in rest["prompt_ids"]),
                            continuations=tuple(tuple(int(i) for i in c) for c in rest["continuations"]),
                            new_tokens=int(rest["new_tokens"]))


def measure_as_on_device(fmt: str, artifact: Path, runtime: dict[str, Any], reference: Path, floor_top1: float,
                         threads: int | None) -> tuple[LLMFidelity, dict[str, Any]]:
    """:func:`measure` in a fresh process that blocks torch where the runtime allows it, as the profiler's worker
    and ``edgeship chat`` run: (fidelity, the runtime's ``info()``).

    Why: ExecuTorch's LLM kernels come from the executorch wheel (built against ATen) in a process that holds torch,
    and from edgeship's shim on a device. An int8-activation program rounds each layer's activations, so the two
    kernel sets' float rounding becomes two different roundings of the reply (SmolLM2 ``pte/int4-weight``: top-1
    0.90 against each other, and the France answer flips; README). The exporting process holds torch."""
    from edgeship.profiling.child import run_module

    job = {"format": fmt, "artifact": str(artifact), "runtime": runtime, "reference": str(reference),
           "floor_top1": floor_top1, "threads": threads}
    run = run_module("edgeship.llm_fidelity", job, MEASURE_TIMEOUT_S, capture=True, prefix="edgeship-fidelity-")
    if run.returncode is None:
        raise ExportError(f"{fmt}: the fidelity check of {artifact.name} timed out after {MEASURE_TIMEOUT_S:.0f} s")
    out = run.result
    if run.returncode != 0 or out is None:
        tail = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
        raise ExportError(f"{fmt}: the fidelity check of {artifact.name} failed in its runner process: {tail}")
    return LLMFidelity.from_dict(out["fidelity"]), out["info"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgeship.llm_fidelity JOB.json RESULT.json``: the worker of :func:`measure_as_on_device`."""
    args = list(argv if argv is not None else sys.argv[1:])
    if len(args) != 2:
        print("usage: python -m edgeship.llm_fidelity JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    from edgeship.profiling.llm.runtime import get_llm_runtime, open_llm
    from edgeship.profiling.runner import write_json_atomic
    from edgeship.profiling.worker import block_torch, torch_blocked

    if get_llm_runtime(job["format"]).runs_torch_free():
        block_torch()
    rt = open_llm(job["format"], Path(job["artifact"]), job["runtime"], threads=job["threads"])
    try:
        fid = measure(rt, load_reference(Path(job["reference"])), float(job["floor_top1"]))
    finally:
        rt.close()
    info = {**rt.info(), "torch_blocked": torch_blocked()}
    write_json_atomic(Path(args[1]), json.dumps({"fidelity": fid.to_dict(), "info": info}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
