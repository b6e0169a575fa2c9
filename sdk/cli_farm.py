"""``edgeship farm status|release`` and ``edgeship profile B... --farm ADDRESS --where TAG=VALUE``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgeship.errors import ConfigError

EXIT_FAIL = 1


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("more_sources", nargs="*", metavar="MORE", help="more bundles: with --farm, every bundle runs on "
                   "every reserved board")
    g = p.add_argument_group("device farm (labgrid; needs edgeship[farm])")
    g.add_argument("--farm", metavar="HOST[:PORT]", help="reserve boards through this labgrid coordinator "
                   "(default port 20408)")
    g.add_argument("--where", action="append", default=[], metavar="TAG=VALUE",
                   help="which places: their tags must match (repeatable), e.g. target=raspberry-pi-5")
    g.add_argument("--count", type=int, default=1, help="how many matching boards to reserve (default %(default)s)")
    g.add_argument("--farm-timeout", type=float, default=600.0, metavar="S",
                   help="wait at most this long for free boards (default %(default)g s)")
    g.add_argument("--pause", type=float, default=0.0, metavar="S",
                   help="pause between two bundles on one board (cool-down where the board has no temperature "
                   "sensor for --cooldown-to)")
    g.add_argument("--workdir", metavar="DIR", help="work directory on each board (default ~/.cache/edgeship-device); {place} is replaced by the place "
                   "name, for boards that share a host or a network file system")


def check_profile_args(a: argparse.Namespace) -> None:
    if a.more_sources and not a.farm:
        raise ConfigError("several bundles in one profile run need --farm (the bundle x board matrix); profile them "
                          "one at a time otherwise")
    if a.farm and (a.device or a.inventory):
        raise ConfigError("--farm reserves its boards itself: leave out --device / --inventory")
    if not a.farm and (a.where or a.count != 1):
        raise ConfigError("--where / --count select boards of a farm: add --farm HOST[:PORT]")
    if a.count < 1 or a.farm_timeout <= 0 or a.pause < 0:
        raise ConfigError(f"--count {a.count} / --farm-timeout {a.farm_timeout:g} / --pause {a.pause:g}: need a count "
                          ">= 1, a timeout > 0 and a pause >= 0")


def profile_farm_cmd(a: argparse.Namespace, cfg: Any) -> int:
    from edgeship import cli_history
    from edgeship.bundle import check_signed
    from edgeship.profiling import report
    from edgeship.profiling.remote.farm import parse_where, profile_farm
    from edgeship.profiling.runner import write_json_atomic

    sources = [a.source, *a.more_sources]
    for s in sources:
        check_signed(s, a.pubkey)  # before anything is copied to a board
    opts = {k: v for k, v in {"identity": a.identity, "accept_new_host_key": a.accept_new_host_key or None}.items()
            if v is not None}
    fleet = profile_farm(sources, address=a.farm, where=parse_where(a.where), count=a.count, config=cfg,
                         artifact=a.artifact, transport_options=opts, timeout=a.farm_timeout, pause_s=a.pause,
                         workdir=a.workdir)
    if a.json_path:
        write_json_atomic(Path(a.json_path), fleet.to_json())
    for src in sources:
        cli_history.record_profile(a, [r for r in fleet.runs if r.identity.get("bundle") == str(Path(src))], src)
    for run in fleet.runs:
        tags = ", ".join(f"{k}={v}" for k, v in (run.identity.get("tags") or {}).items())
        print(f"== {run.identity.get('place')} [{tags}] {run.identity.get('bundle')}")
        if run.profile is not None:
            print(report.render(run.profile))
        if run.error:
            print(f"{run.identity.get('place')}: ERROR {run.error}")
        print()
    if a.html_path:
        from edgeship.profiling.html import write_html

        write_html(fleet.runs, Path(a.html_path))
        print(f"HTML report: {a.html_path}")
    return 0 if fleet.ok else EXIT_FAIL


def cmd_farm(a: argparse.Namespace) -> int:
    from edgeship.profiling.remote import farm

    if a.action == "release":
        if not a.place:
            raise ConfigError("edgeship farm release PLACE --coordinator HOST[:PORT]")
        holder = farm.release(a.coordinator, a.place)
        print(f"released place {a.place} (held by {holder})" if holder else f"place {a.place} was not acquired")
        return 0
    address, places = farm.status(a.coordinator, farm.parse_where(a.where))
    if a.json:
        print(json.dumps({"coordinator": address, "places": [p.to_dict() for p in places]}, indent=2))
        return 0
    from edgeship.profiling.report import table

    print(f"coordinator {address}: {len(places)} place(s)")
    print(table([[p.name, ", ".join(f"{k}={v}" for k, v in sorted(p.tags.items())) or "-", p.acquired or "free",
                  p.reservation or "-", p.ssh_url or "(no NetworkService)"] for p in places],
                ["place", "tags", "held by", "reservation", "ssh"]))
    return 0


def add_parsers(sub: Any) -> None:
    f = sub.add_parser("farm", help="the boards of a labgrid device farm: who holds which (needs edgeship[farm])")
    f.add_argument("action", choices=["status", "release"], help="status: places, tags, holders; release PLACE: free "
                   "a place whose holder died on another host")
    f.add_argument("place", nargs="?")
    f.add_argument("--coordinator", metavar="HOST[:PORT]", help="labgrid coordinator (default: $LG_COORDINATOR)")
    f.add_argument("--where", action="append", default=[], metavar="TAG=VALUE", help="only places with these tags")
    f.add_argument("--json", action="store_true")
    f.set_defaults(fn=cmd_farm)
