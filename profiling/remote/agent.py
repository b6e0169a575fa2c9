"""Device side of a remote profile: ``python -m edgeship.profiling.remote.agent JOB.json RESULT.json``.

Runs the job's runner (``kind``: ``encoder``, the ordinary runner; ``llm``, the LLM bench) once
per artifact (each still in its own worker process) and, after each one, prints a
``EDGESHIP-RESULT {json}`` line on stdout; RESULT.json is written at the end.
The host reads those lines as they stream, so when the connection dies mid-run the artifacts
already measured are not lost. Progress lines go to stderr. Torch-free like the rest of the runner.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeship.profiling.remote.transport import DEVICE_TAG, RESULT_TAG


def _encoder(job: dict[str, Any], out: Path, streamed: Callable[[dict[str, Any]], None]) -> None:
    from edgeship.profiling.results import RunConfig
    from edgeship.profiling.runner import profile, write_json_atomic

    res = profile(job["source"], artifact=job.get("artifacts") or None, config=RunConfig.from_dict(job["config"]),
                  on_result=lambda r: streamed(r.to_dict()))
    write_json_atomic(out, res.to_json())


def _llm(job: dict[str, Any], out: Path, streamed: Callable[[dict[str, Any]], None]) -> None:
    from edgeship.profiling.llm.bench import LLMRunConfig, profile_llm

    # The pushed manifest lists only the artifacts asked for, so the bench runs all of them.
    profile_llm(job["source"], config=LLMRunConfig.from_dict(job["config"]), json_path=out,
                on_result=lambda r: streamed(r.to_dict()))


#: job kind -> the runner for it (the host side of a kind is a RemoteJob in .jobs)
KINDS: dict[str, Callable[[dict[str, Any], Path, Callable[[dict[str, Any]], None]], None]] = {
    "encoder": _encoder, "llm": _llm}


def run(job: dict[str, Any], out: Path) -> int:
    from edgeship.errors import UnknownKeyError
    from edgeship.profiling import sysinfo

    kind = str(job.get("kind") or "encoder")
    if kind not in KINDS:
        raise UnknownKeyError("remote job kind", kind, KINDS)
    device = sysinfo.describe()
    print(DEVICE_TAG + json.dumps(device.to_dict()), flush=True)

    def streamed(record: dict[str, Any]) -> None:
        print(RESULT_TAG + json.dumps(record), flush=True)

    KINDS[kind](job, out, streamed)
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
