"""A device farm through a labgrid coordinator: reserve boards by tag, profile on each over SSH, always release.

labgrid (PyPI ``labgrid``, the ``[farm]`` extra) does the scheduling: *places* with exclusive locks, tags
(``target=raspberry-pi-5``), reservations that wait for a matching free place, and exporters publishing each
board's ``NetworkService`` (address, user, port). edgeship only asks: it creates one reservation per board it
needs, waits for the coordinator to allocate them (polling, which also keeps them alive), acquires the places,
and runs the ordinary ``ssh://`` session (:class:`~.session.DeviceSession`) on each board's network service.
Every place is released and every reservation cancelled in a ``finally``, so an exception, a dropped link,
Ctrl-C or SIGTERM frees the boards; a process killed outright cannot run that code, so each place is acquired
under a name that says which process holds it (``host/user.edgeship-PID``) and the next edgeship on that host
releases places whose holder is gone (``edgeship farm release PLACE`` does it for another host's).

Each place's name and tags are the device's identity in the results and the history; a ``target`` tag naming an
edgeship target profile supplies the power model and thread count as an inventory's ``target`` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.errors import ConfigError, DeviceError, RuntimeMissingError
from edgeship.profiling.remote.fleet import FleetProgress
from edgeship.profiling.remote.jobs import EncoderJob
from edgeship.profiling.remote.session import DeviceSession
from edgeship.profiling.remote.transport import options_for
from edgeship.profiling.results import DeviceRun, FleetResult, RunConfig

DEFAULT_PORT = 20408
ADDRESS_ENV = "LG_COORDINATOR"  # labgrid-client's own variable for the coordinator address
_TAG_KEY = re.compile(r"[a-z][a-z0-9_]+")  # what the coordinator accepts as a tag key
_TAG_VAL = re.compile(r"[A-Za-z0-9_.:-]+")
_HOLDER = re.compile(r"(?P<host>[^/]+)/(?P<user>.+)\.edgeship-(?P<pid>\d+)")
_RPC_TIMEOUT = 30.0
Log = Callable[[str], None]


def parse_where(items: Sequence[str]) -> dict[str, str]:
    """``--where target=raspberry-pi-5`` (repeatable) as a reservation filter."""
    out: dict[str, str] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not _TAG_KEY.fullmatch(k) or not _TAG_VAL.fullmatch(v):
            raise ConfigError(f"--where {it!r}: expected TAG=VALUE with a lower-case tag name (letters, digits, _) "
                              "and a value without spaces, e.g. target=raspberry-pi-5")
        out[k] = v
    return out


def coordinator_address(address: str | None) -> str:
    addr = address or os.environ.get(ADDRESS_ENV)
    if not addr:
        raise ConfigError(f"no coordinator: pass --farm HOST[:PORT] (or --coordinator) or set ${ADDRESS_ENV}")
    if addr.count(":") == 0 or (addr.startswith("[") and addr.endswith("]")):
        addr = f"{addr}:{DEFAULT_PORT}"
    return addr


def holder_name() -> str:
    """The name this process acquires places under: labgrid's host/user, plus which edgeship process."""
    return f"{socket.gethostname()}/{getpass.getuser()}.edgeship-{os.getpid()}"


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


@dataclass(frozen=True)
class Place:
    """A place as the coordinator shows it, with the board's SSH endpoint from its NetworkService resource."""

    name: str
    tags: Mapping[str, str]
    acquired: str | None
    reservation: str | None
    ssh_url: str | None
    comment: str = ""
    exporter_host: str | None = None

    def matches(self, where: Mapping[str, str]) -> bool:
        return all(self.tags.get(k) == v or (k == "name" and self.name == v) for k, v in where.items())

    def stale_holder(self) -> int | None:
        """The pid of a dead edgeship process on this host that still holds the place, else None."""
        m = _HOLDER.fullmatch(self.acquired or "")
        if m and m["host"] == socket.gethostname() and _pid_gone(int(m["pid"])):
            return int(m["pid"])
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tags": dict(self.tags)}


@dataclass(frozen=True)
class Lease:
    token: str
    place: str


def _labgrid() -> Any:
    try:
        from labgrid.remote import client
    except ImportError:
        raise RuntimeMissingError("the farm needs labgrid: pip install 'edgeship[farm]'") from None
    return client


def _from_labgrid(record: logging.LogRecord) -> bool:
    return f"{os.sep}labgrid{os.sep}" not in record.pathname


def _quiet_labgrid() -> None:
    """labgrid's client logs on the root logger ("coordinator is unavailable" with a traceback); our errors say
    it in one line, so drop those records there and leave every other logger's alone."""
    root = logging.getLogger()
    if _from_labgrid not in root.filters:
        root.addFilter(_from_labgrid)


class Coordinator:
    """One client connection to a labgrid coordinator, its asyncio loop on a thread of its own so that the
    place and resource updates keep streaming in while the main thread waits on boards."""

    def __init__(self, address: str | None, connect_timeout: float = 10.0) -> None:
        self.address = coordinator_address(address)
        client = _labgrid()
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2

        self.pb2 = pb2
        _quiet_labgrid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="labgrid-client", daemon=True)
        self._thread.start()
        name = holder_name()

        class Session(client.ClientSession):  # type: ignore[misc, name-defined]
            def gethostname(self) -> str:
                return name.split("/", 1)[0]

            def getuser(self) -> str:
                return name.split("/", 1)[1]

        async def start() -> Any:
            s = Session(self.address, self.loop)
            await s.start()
            return s

        try:
            self.session = self._call(start(), connect_timeout)
        except Exception:
            self.close()
            raise DeviceError(f"cannot reach the labgrid coordinator at {self.address}: is labgrid-coordinator "
                              "running there (and the port right)?") from None
        self.name = name

    def _call(self, coro: Any, timeout: float = _RPC_TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _rpc(self, method: str, request: Any, what: str) -> Any:
        import grpc

        async def call() -> Any:
            try:
                resp = await getattr(self.session.stub, method)(request)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    raise DeviceError(f"lost the labgrid coordinator at {self.address} while {what}") from None
                raise DeviceError(f"labgrid coordinator {self.address}: {what} failed: {e.details()}") from None
            await self.session.sync_with_coordinator()
            return resp

        return self._call(call())

    def places(self) -> list[Place]:
        async def snapshot() -> list[Place]:  # on the loop's thread: the update stream mutates these dicts there
            return self._places()

        return list(self._call(snapshot()))

    def _places(self) -> list[Place]:
        s = self.session
        out = []
        for name, p in sorted(s.places.items()):
            ssh, host = None, None
            for exporter, groups in s.resources.items():
                for group, resources in groups.items():
                    for rname, r in resources.items():
                        if r.cls == "NetworkService" and p.hasmatch((exporter, group, r.cls, rname)):
                            a = r.params
                            ssh = f"ssh://{a['username']}@{a['address']}:{int(a.get('port') or 22)}"
                            host = (r.extra or {}).get("proxy")
            out.append(Place(name, dict(p.tags), p.acquired or None, p.reservation or None, ssh, p.comment or "",
                             host))
        return out

    def place(self, name: str) -> Place:
        for p in self.places():
            if p.name == name:
                return p
        raise DeviceError(f"labgrid coordinator {self.address} has no place {name!r}: `edgeship farm status` lists them")

    def acquire(self, place: str) -> None:
        self._rpc("AcquirePlace", self.pb2.AcquirePlaceRequest(placename=place), f"acquiring place {place}")

    def release(self, place: str, holder: str | None = None) -> None:
        req = self.pb2.ReleasePlaceRequest(placename=place, **({"fromuser": holder} if holder else {}))
        self._rpc("ReleasePlace", req, f"releasing place {place}")

    def reserve(self, where: Mapping[str, str]) -> str:
        flt = {"main": self.pb2.Reservation.Filter(filter=dict(where))}
        resp = self._rpc("CreateReservation", self.pb2.CreateReservationRequest(filters=flt, prio=0.0),
                         "creating a reservation")
        return str(resp.reservation.token)

    def poll(self, token: str) -> str | None:
        """The allocated place, or None while the reservation waits (polling also keeps it alive)."""
        from labgrid.remote.common import Reservation, ReservationState

        resp = self._rpc("PollReservation", self.pb2.PollReservationRequest(token=token), "polling a reservation")
        res = Reservation.from_pb2(resp.reservation)
        if res.state in (ReservationState.allocated, ReservationState.acquired) and res.allocations.get("main"):
            return str(res.allocations["main"][0])
        if res.state in (ReservationState.expired, ReservationState.invalid):
            raise DeviceError(f"reservation {token} became {res.state.name} at the coordinator {self.address}")
        return None

    def cancel(self, token: str) -> None:
        self._rpc("CancelReservation", self.pb2.CancelReservationRequest(token=token), "cancelling a reservation")

    def reservations(self) -> list[Any]:
        return list(self._rpc("GetReservations", self.pb2.GetReservationsRequest(), "listing reservations")
                    .reservations)

    def reclaim_stale(self, log: Log) -> None:
        """Free places (and drop reservations) held by edgeship processes on this host that are gone."""
        for p in self.places():
            pid = p.stale_holder()
            if pid is not None and p.acquired:
                self.release(p.name, holder=p.acquired)
                log(f"reclaimed place {p.name}: its holder, edgeship process {pid} on this host, is gone")
        for r in self.reservations():
            m = _HOLDER.fullmatch(r.owner)
            if m and m["host"] == socket.gethostname() and _pid_gone(int(m["pid"])):
                try:
                    self.cancel(r.token)
                except DeviceError:
                    pass  # expired meanwhile

    def close(self) -> None:
        s = getattr(self, "session", None)
        if s is not None:
            try:
                self._call(s.stop(), 5)
                self._call(s.close(), 5)
            except Exception:  # closing a dead connection; nothing left to save
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@dataclass
class Holding:
    """What this process holds at the coordinator; :meth:`release_all` gives it all back."""

    coordinator: Coordinator
    tokens: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)

    def release_all(self, log: Log) -> None:
        for place in self.places:
            try:
                self.coordinator.release(place, holder=self.coordinator.name)
                log(f"released place {place}")
            except DeviceError as e:
                log(f"could not release place {place}: {e}")
        for token in self.tokens:
            try:
                self.coordinator.cancel(token)
            except DeviceError:
                pass  # already gone (expired or cancelled by the coordinator)
        self.places.clear()
        self.tokens.clear()


def _check_supply(places: Sequence[Place], where: Mapping[str, str], count: int, address: str) -> None:
    matching = [p for p in places if p.matches(where)]
    wanted = ", ".join(f"{k}={v}" for k, v in where.items()) or "(any place)"
    if len(matching) < count:
        tags = sorted({f"{k}={v}" for p in places for k, v in p.tags.items()})
        raise DeviceError(f"the farm at {address} has {len(matching)} place(s) matching {wanted}, {count} needed; "
                          f"tags there: {', '.join(tags) or '(none)'}")
    missing = [p.name for p in matching if p.ssh_url is None]
    if len(matching) - len(missing) < count:
        raise DeviceError(f"place(s) {', '.join(missing)} have no NetworkService resource (address, username, port "
                          "in the exporter's YAML): edgeship reaches boards over SSH")


def reserve(coord: Coordinator, holding: Holding, where: Mapping[str, str], count: int, timeout: float,
            log: Log) -> list[Place]:
    """Reserve, wait for and acquire ``count`` places matching ``where``; the holding records each step."""
    coord.reclaim_stale(log)
    _check_supply(coord.places(), where, count, coord.address)
    for _ in range(count):
        holding.tokens.append(coord.reserve(where))
    deadline = time.monotonic() + timeout
    allocated: dict[str, str] = {}
    said = False
    while len(allocated) < count:
        for token in holding.tokens:
            if token not in allocated and (place := coord.poll(token)) is not None:
                allocated[token] = place
        if len(allocated) == count:
            break
        if time.monotonic() > deadline:
            busy = [f"{p.name} ({'held by ' + p.acquired if p.acquired else 'reserved'})" for p in coord.places()
                    if p.matches(where) and p.name not in allocated.values()]
            raise DeviceError(f"no free place matching {', '.join(f'{k}={v}' for k, v in where.items())} within "
                              f"{timeout:.0f} s ({len(allocated)} of {count} allocated; busy: {', '.join(busy)}); "
                              "try again later or raise --farm-timeout")
        if not said:
            log(f"waiting for {count - len(allocated)} place(s) to become free (up to {timeout:.0f} s)")
            said = True
        time.sleep(1.0)
    for place in allocated.values():
        coord.acquire(place)
        holding.places.append(place)
        log(f"acquired place {place}")
    return [coord.place(p) for p in allocated.values()]


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM (and SIGHUP) become KeyboardInterrupt, so the finally that releases the places runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _place_config(place: Place, config: RunConfig) -> RunConfig:
    """A place whose ``target`` tag names an edgeship target profile gets its power model and threads."""
    from edgeship.errors import UnknownKeyError
    from edgeship.targets import get_profile

    name = place.tags.get("target")
    if not name:
        return config
    try:
        prof = get_profile(name)
    except UnknownKeyError:
        return config  # a lab's own tag value; the place still runs, with the command line's settings
    return dataclasses.replace(config, power_target=config.power_target or name,
                               threads=config.threads or prof.threads)


def _board_jobs(place: Place, sources: Sequence[Path], config: RunConfig, options: Any, view: FleetProgress,
                artifact: str | None, pause_s: float, address: str, workdir: str | None,
                sessions: list[DeviceSession[DeviceRun]], stop: threading.Event) -> list[DeviceRun]:
    """Every bundle on one board, one after the other (a board never runs two jobs at once)."""
    runs = []
    for i, src in enumerate(sources):
        if i and pause_s:
            view.logger(place.name)(f"pausing {pause_s:g} s before the next bundle")
            stop.wait(pause_s)
        if stop.is_set():  # interrupted: no new job on any board
            break
        assert place.ssh_url is not None
        s = DeviceSession(place.ssh_url, options, EncoderJob(_place_config(place, config)), view.logger(place.name),
                          workdir=workdir.replace("{place}", place.name) if workdir else None, name=place.name)
        s.identity.update(place=place.name, tags=dict(place.tags), farm=address, bundle=str(src))
        sessions.append(s)
        runs.append(s.run(src, artifact))
    return runs


def profile_farm(sources: Sequence[str | Path], *, address: str | None, where: Mapping[str, str], count: int = 1,
                 config: RunConfig | None = None, artifact: str | None = None,
                 transport_options: Mapping[str, Any] | None = None, timeout: float = 600.0, pause_s: float = 0.0,
                 workdir: str | None = None, progress: FleetProgress | None = None) -> FleetResult:
    """Reserve ``count`` places matching ``where``, run every source on every place, release them all.

    Boards run in parallel; on each, the sources run one after the other. A board that fails keeps the others'
    results (its runs have ``status: "error"`` and say why). Runs come back grouped by source, then place.
    """
    config = config or RunConfig()
    if count < 1:
        raise ConfigError(f"--count must be >= 1, got {count}")
    srcs = [Path(s) for s in sources]
    for s in srcs:
        if not s.exists():
            raise ConfigError(f"nothing to profile at {s}: give bundle directories, .zip bundles or model files")
    options = options_for("ssh", dict(transport_options or {}))
    view = progress or FleetProgress(enabled=config.progress)
    say = view.logger("farm")
    coord = Coordinator(address)
    holding = Holding(coord)
    sessions: list[DeviceSession[DeviceRun]] = []
    stop = threading.Event()
    try:
        with _signals_raise():
            places = reserve(coord, holding, where, count, timeout, say)
            with ThreadPoolExecutor(max_workers=len(places), thread_name_prefix="farm-board") as pool:
                futures = [pool.submit(_board_jobs, p, srcs, config, options, view, artifact, pause_s, coord.address,
                                       workdir, sessions, stop) for p in places]
                try:
                    while not all(f.done() for f in futures):
                        wait(futures, timeout=0.5)
                except KeyboardInterrupt:
                    stop.set()
                    _abort(sessions)
                    raise
                per_board = [f.result() for f in futures]  # a failed board is error runs, never an exception
    finally:
        holding.release_all(say)
        coord.close()
    return FleetResult(tuple(runs[i] for i in range(len(srcs)) for runs in per_board if i < len(runs)))


def _abort(sessions: Sequence[DeviceSession[DeviceRun]]) -> None:
    """Interrupted: cut every board's connection so its thread ends now, not after the measurement."""
    for s in sessions:
        if s.t is not None:
            s.t.close()


def status(address: str | None, where: Mapping[str, str] | None = None) -> tuple[str, list[Place]]:
    coord = Coordinator(address)
    try:
        return coord.address, [p for p in coord.places() if p.matches(where or {})]
    finally:
        coord.close()


def release(address: str | None, place: str) -> str | None:
    """Release a place whoever holds it (a client killed on another host); returns the holder it had."""
    coord = Coordinator(address)
    try:
        p = coord.place(place)
        if p.acquired:
            coord.release(place, holder=p.acquired)
        return p.acquired
    finally:
        coord.close()
