"""Output comparison between an artifact and the reference model (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeship.manifest import Fidelity


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], output: str,
            floor_mean_cosine: float, classifier: bool = False) -> Fidelity:
    """Per-sample cosine similarity, absolute error and (for classifiers) top-1 agreement.

    ``reference`` and ``candidate`` hold one array per held-out sample (batch first).
    For token-level classifiers top-1 agreement is per token.
    """
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"fidelity: {len(reference)} reference vs {len(candidate)} candidate outputs")
    cos: list[float] = []
    max_abs = 0.0
    abs_sum = 0.0
    n_el = 0
    agree = 0
    total = 0
    for r, c in zip(reference, candidate, strict=True):
        r = np.asarray(r, dtype=np.float64)
        c = np.asarray(c, dtype=np.float64)
        if r.shape != c.shape:
            raise ValueError(f"fidelity: output '{output}' shape {list(c.shape)} differs from the reference {list(r.shape)}")
        if not np.all(np.isfinite(c)):
            cos.append(0.0)
            max_abs = float("inf")
            continue
        diff = np.abs(r - c)
        max_abs = max(max_abs, float(diff.max()) if diff.size else 0.0)
        abs_sum += float(diff.sum())
        n_el += diff.size
        rr, cc = _rows(r), _rows(c)
        num = (rr * cc).sum(axis=1)
        den = np.linalg.norm(rr, axis=1) * np.linalg.norm(cc, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cs = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.allclose(rr, cc), 1.0, 0.0))
        cos.extend(float(x) for x in cs)
        if classifier:
            a, b = r.argmax(axis=-1), c.argmax(axis=-1)
            agree += int((a == b).sum())
            total += a.size
    mean_cos = float(np.mean(cos))
    return Fidelity(
        output=output, n_samples=len(cos), max_abs_err=max_abs, mean_abs_err=abs_sum / max(n_el, 1),
        mean_cosine=mean_cos, min_cosine=float(np.min(cos)), p5_cosine=float(np.percentile(cos, 5)),
        top1_agreement=(agree / total) if classifier and total else None,
        floor_mean_cosine=floor_mean_cosine, passed=bool(mean_cos >= floor_mean_cosine),
    )
