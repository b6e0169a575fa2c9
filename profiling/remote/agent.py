"""Device side of a remote profile: ``python -m edgeship.profiling.remote.agent JOB.json RESULT.json``.

Runs the ordinary runner once per artifact (each still in its own worker process) and, after
each one, prints a ``EDGESHIP-RESULT {json}`` line on stdout; RESULT.json is written at the end.
The host reads those lines as they stream, so when the connection dies mid-run the artifacts
already measured are not lost. Progress lines go to stderr. Torch-free like the rest of the runner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from edgeship.profiling.remote.transport import DEVICE_TAG, RESULT_TAG


def run(job: dict[str, Any], out: Path) -> int:
    from edgeship.profiling import sysinfo
    from edgeship.profiling.results import ArtifactResult, RunConfig
    from edgeship.profiling.runner import profile, write_json_atomic

    device = sysinfo.describe()
    print(DEVICE_TAG + json.dumps(device.to_dict()), flush=True)

    def streamed(r: ArtifactResult) -> None:
        print(RESULT_TAG + json.dumps(r.to_dict()), flush=True)

    res = profile(job["source"], artifact=job.get("artifacts") or None, config=RunConfig.from_dict(job["config"]),
                  on_result=streamed)
    write_json_atomic(out, res.to_json())
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
