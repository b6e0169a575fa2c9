"""How close `edgeship predict` gets on a machine you can also measure.

    python benchmarks/bench_predict.py BUNDLE RESULTS.json [--profile benchmarks/data/build-vm.toml]

RESULTS.json: `edgeship profile BUNDLE --json` on this machine; --profile: the target profile describing this
machine. Prints, per artifact, the prediction fitted on all of RESULTS (in-sample, as `edgeship predict` does)
and the leave-one-out prediction (its runtime's efficiency fitted without that artifact: the honest estimate of
how a new artifact would be predicted), each against the measured p50; exits 1 when an in-sample prediction is
off by more than --factor (default 2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeship.manifest import load_bundle
from edgeship.profiling import predict
from edgeship.profiling.decide import load_documents
from edgeship.targets import get_profile

HERE = Path(__file__).parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("results")
    ap.add_argument("--profile", default=str(HERE / "data" / "build-vm.toml"))
    ap.add_argument("--factor", type=float, default=2.0)
    a = ap.parse_args()
    bundle, prof = load_bundle(a.bundle), get_profile(a.profile)
    costs = {art.key: predict.graph_cost(bundle, art) for art in bundle.manifest.artifacts}
    (run,) = load_documents([a.results])
    assert run.profile is not None
    points = predict.fit_points(costs, run.profile, prof)
    measured = {p[2]: p[4] for p in points}
    inside = {p.artifact: p for p in predict.predict(list(costs.values()), prof, predict.fit(points), measured)}
    worst = 1.0
    print(f"{'artifact':22} {'measured':>9} {'predicted':>10} {'ratio':>6} {'fit error':>10} {'leave-one-out':>14} {'ratio':>6}")
    for key, p in inside.items():
        if p.predicted_ms is None or p.measured_p50_ms is None:
            continue
        loo_fit = predict.fit([q for q in points if q[2] != key])
        (loo,) = predict.predict([costs[key]], prof, loo_fit)
        ratio = p.predicted_ms / p.measured_p50_ms
        worst = max(worst, ratio, 1 / ratio)
        loo_txt = "-" if loo.predicted_ms is None else f"{loo.predicted_ms:.3g}"
        loo_ratio = "-" if loo.predicted_ms is None else f"{loo.predicted_ms / p.measured_p50_ms:.2f}"
        print(f"{key:22} {p.measured_p50_ms:9.3g} {p.predicted_ms:10.3g} {ratio:6.2f} {'x/÷' + format(p.fit_error or 1, '.2f'):>10}"
              f" {loo_txt:>14} {loo_ratio:>6}")
    print(f"worst in-sample factor {worst:.2f} (limit {a.factor:g})")
    return 0 if worst <= a.factor else 1


if __name__ == "__main__":
    sys.exit(main())
