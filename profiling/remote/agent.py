"""Device side of a remote profile: ``python -m edgeship.profiling.remote.agent JOB.json RESULT.json``.

Runs the ordinary runner once per artifact (each still in its own worker process) and, after
each one, prints a ``EDGESHIP-RESULT {json}`` line on stdout and rewrites RESULT.json. The host
reads those lines as they stream, so when the connection dies mid-run the artifacts already
measured are not lost. Progress lines go to stderr. Torch-free like the rest of the runner.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from edgeship.profiling.remote.transport import DEVICE_TAG, RESULT_TAG


def run(job: dict[str, Any], out: Path) -> int:
    from edgeship.profiling import sysinfo
    from edgeship.profiling.runner import ProfileResult, RunConfig, profile, write_json_atomic

    raw = dict(job["config"])
    raw["shapes"] = {k: tuple(v) for k, v in raw.get("shapes", {}).items()}
    cfg = RunConfig(**raw)
    device = sysinfo.describe()
    print(DEVICE_TAG + json.dumps(device), flush=True)
    results: list[dict[str, Any]] = []
    target = None
    for artifact in job.get("artifacts") or [None]:
        res = profile(job["source"], artifact=artifact, config=cfg)
        target = res.target
        for r in res.results:
            results.append(r)
            print(RESULT_TAG + json.dumps(r), flush=True)
        doc = ProfileResult(device=device, config=cfg.to_dict(), results=tuple(results), source=job["source"],
                            target=target, created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            edgeship_version=res.edgeship_version)
        write_json_atomic(out, doc.to_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    from edgeship.errors import EdgeshipError

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m edgeship.profiling.remote.agent JOB.json RESULT.json", file=sys.stderr)
        return 2
    try:
        return run(json.loads(Path(args[0]).read_text()), Path(args[1]))
    except EdgeshipError as e:
        print(f"edgeship: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
