"""The ``edgeship`` command line. One line of error, non-zero exit, traceback only with --debug."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeship import cli_decide, cli_farm, cli_history, cli_llm, quiet
from edgeship.errors import ConfigError, EdgeshipError
from edgeship.vocab import FORMATS, LLM_FORMATS, LLM_RECIPES, METERS, RECIPES, TASKS, listing

EXIT_USAGE = 2
EXIT_FAIL = 1


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="bundle directory, or a .onnx / .tflite / .pte file")
    p.add_argument("--artifact", help="one artifact of the bundle: FORMAT/RECIPE or its path")
    _add_run_length_args(p)
    p.add_argument("--max-seconds", type=float, default=_run_defaults()["max_seconds"],
                   help="stop after this long whatever the count (default %(default)s s)")
    p.add_argument("--warmup", type=int, default=_run_defaults()["warmup"], help="untimed runs before measuring (default %(default)s)")
    p.add_argument("--repeat", type=int, default=_run_defaults()["repeat"], metavar="K",
                   help="K fresh processes per artifact, interleaved across artifacts; prints each median p50 with "
                        "its 95%% bootstrap interval, and `report` says when a pick is indistinguishable")
    p.add_argument("--soak", type=int, metavar="N", help="then N more inferences per artifact, sampling RSS 50 times; "
                   "reports the RSS growth after warm-up per 1,000 inferences (a leak check)")
    p.add_argument("--inputs", metavar="FILE", help="time your own inputs, round-robin: texts (.txt one per line, "
                   ".jsonl with a \"text\" field), arrays (.npz keyed by input name) or an image folder; reports "
                   "latency by input length and how the artifacts agree on them")
    p.add_argument("--threads", type=int, help="runtime threads (default: the bundle's target profile)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=DxD",
                   help="size of dynamic dims for synthesised inputs, e.g. input_ids=1x128 (repeatable)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="runtime option, e.g. graph_optimization=all, delegate=/path/libdelegate.so, "
                        "engine=auto|compiled|interpreter (.tflite)")
    p.add_argument("--delegate", metavar="PATH", help="external LiteRT delegate (.so) for .tflite files; the report says "
                   "which ops it took, or why it failed and that the CPU ran instead")
    p.add_argument("--method", help="the method of a .pte file to run (default: forward, or its only method)")
    p.add_argument("--energy", default=_run_defaults()["energy"], help="auto (best real meter, else estimate), off, or a meter: "
                   + listing(METERS))
    p.add_argument("--idle-seconds", type=float, default=_run_defaults()["idle_seconds"],
                   help="idle power window before and after the run (default %(default)s s)")
    p.add_argument("--sample-hz", type=float, default=_run_defaults()["sample_hz"], help="power meter sampling rate (default %(default)s)")
    p.add_argument("--energy-csv", help="log of an external USB power meter (csv meter)")
    p.add_argument("--cooldown-to", type=float, metavar="C", help="wait until the SoC is below C degrees first")
    p.add_argument("--target", help="target profile whose power model the energy estimate uses")
    p.add_argument("--per-op", action="store_true", help="per-operator timings where the runtime supports it")
    p.add_argument("--simulate-npu", action="store_true", help="no Hexagon NPU here: check the compiled QNN context "
                   "model's numerics on the x86 HTP simulator (its times are SIMULATED, not latency)")
    p.add_argument("--device", action="append", default=[], metavar="ssh://user@host[:port]",
                   help="profile on a remote device (repeatable: a fleet)")
    p.add_argument("--inventory", help="TOML file naming devices and their target profiles")
    p.add_argument("--identity", help="SSH private key file")
    p.add_argument("--accept-new-host-key", action="store_true", help="trust an unknown host key (like accept-new)")
    p.add_argument("--no-isolate", action="store_true", help="measure in this process (peak RSS then covers all)")
    p.add_argument("--json", dest="json_path", help="write the results as JSON")
    p.add_argument("--html", dest="html_path", help="write an HTML report with plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_verbose(p)
    p.add_argument("--pubkey", help="refuse a bundle this key did not sign (default: $EDGESHIP_PUBKEY)")
    cli_decide.add_sweep_arg(p)
    cli_history.add_profile_args(p)
    cli_farm.add_profile_args(p)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="show other libraries' output (torch, ExecuTorch, LiteRT, "
                   "onnxruntime) here instead of in a log file (also: EDGESHIP_VERBOSE=1)")


@functools.cache
def _run_defaults() -> dict[str, Any]:
    """``RunConfig``'s defaults: the CLI shows and passes these rather than repeating them."""
    import dataclasses

    from edgeship.profiling.runner import RunConfig

    return {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}


def _add_run_length_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=_run_defaults()["runs"], help="at least this many timed runs (default %(default)s)")
    p.add_argument("--min-seconds", type=float, default=_run_defaults()["min_seconds"],
                   help="and at least this long (default %(default)s s)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    # Not argparse choices=: the export core rejects a wrong name with a one-line error naming the closest valid
    # one (argparse would print usage), and a format added by an entry point is valid too.
    p.add_argument("--format", action="append", help=f"{listing(FORMATS)}; a causal LM: {listing(LLM_FORMATS)} "
                   "(repeatable; default: the profile's)")
    p.add_argument("--quant", action="append", help=f"{listing(RECIPES)}; a causal LM: {listing(LLM_RECIPES)} "
                   "(repeatable; default: the profile's)")


def _jobs(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--jobs takes a whole number >= 1 or 'auto', got {text!r}")
    return int(text)


def _add_jobs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", default="auto", metavar="N|auto",
                   help="processes making artifacts side by side, each loads the model again (default auto: one per "
                        ".pte recipe, up to the CPUs idle right now)")


def _kv(items: Sequence[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise ConfigError(f"{flag} {it!r}: expected KEY=VALUE")
        out[k] = v
    return out


def _run_config(a: argparse.Namespace) -> Any:
    from edgeship.profiling.results import RunConfig
    from edgeship.spec import parse_shape_overrides

    return RunConfig(runs=a.runs, min_seconds=a.min_seconds, max_seconds=a.max_seconds, warmup=a.warmup,
                     threads=a.threads, shapes=parse_shape_overrides(a.shape), energy=a.energy,
                     idle_seconds=a.idle_seconds, sample_hz=a.sample_hz, cooldown_to_c=a.cooldown_to,
                     energy_csv=a.energy_csv, power_target=a.target, options={**_kv(a.option, "--option"), **({"delegate": a.delegate} if a.delegate else {})},
                     per_op=a.per_op, progress=not a.quiet, simulate_npu=a.simulate_npu, method=a.method,
                     repeat=getattr(a, "repeat", 1), soak=getattr(a, "soak", None), inputs=getattr(a, "inputs", None))


def cmd_profile(a: argparse.Namespace) -> int:
    from edgeship.profiling import report
    from edgeship.profiling.llm.bench import is_llm_bundle
    from edgeship.profiling.results import DeviceRun
    from edgeship.profiling.runner import profile, write_json_atomic

    cli_farm.check_profile_args(a)
    if is_llm_bundle(a.source):
        if getattr(a, "inputs", None):
            raise ConfigError("--inputs times an encoder or classifier bundle on your inputs; an LLM bundle is timed "
                              "by --prompt-lengths and --new-tokens")
        return cli_llm.profile_llm_cmd(a)
    cfg = _run_config(a)
    if a.farm:
        return cli_farm.profile_farm_cmd(a, cfg)
    if getattr(a, "sweep", None):
        return cli_decide.profile_sweep_cmd(a, cfg)
    if a.device or a.inventory:
        from edgeship.bundle import check_signed
        from edgeship.profiling.remote import profile_fleet

        check_signed(a.source, a.pubkey)  # before anything is copied to a device

        fleet = profile_fleet(a.source, devices=a.device, inventory=a.inventory, config=cfg, artifact=a.artifact,
                              identity=a.identity, accept_new_host_key=a.accept_new_host_key)
        if a.json_path:
            write_json_atomic(Path(a.json_path), fleet.to_json())
        cli_history.record_profile(a, fleet.runs, a.source)
        for run in fleet.runs:
            print(f"== {run.identity.get('name') or run.url}")
            if run.profile is not None:  # a device that failed mid-run still shows what it measured
                print(report.render(run.profile))
            if run.error:
                print(f"{run.url}: ERROR {run.error}")
            print()
        _html(a, fleet.runs)
        return 0 if fleet.ok else EXIT_FAIL
    with quiet.for_command("profile", a.verbose):
        res = profile(a.source, artifact=a.artifact, config=cfg, isolate=not a.no_isolate, json_path=a.json_path,
                      pubkey=a.pubkey)
    print(report.render(res))
    if cfg.repeat > 1:
        from edgeship.profiling.decide import rows_of, spreads

        print(f"p50 over {cfg.repeat} fresh processes per artifact (median, 95% bootstrap interval):")
        for s in spreads(rows_of([DeviceRun(res)]), "latency").values():
            print(f"  {s.describe()} ms")
    cli_history.record_profile(a, [DeviceRun(res)], a.source)
    _html(a, [DeviceRun(res)])
    return 0 if res.ok else EXIT_FAIL


def _html(a: argparse.Namespace, runs: Any) -> None:
    if getattr(a, "html_path", None):
        from edgeship.profiling.html import write_html

        write_html(runs, Path(a.html_path))
        print(f"HTML report: {a.html_path}")


def cmd_report(a: argparse.Namespace) -> int:
    from edgeship.profiling.decide import Budget, decide, load_documents, render
    from edgeship.profiling.runner import write_json_atomic

    if cli_llm.report_is_llm(a.results):
        return cli_llm.report_llm_cmd(a)
    runs = load_documents(a.results)
    budget = Budget(max_p99_ms=a.max_p99_ms, max_p50_ms=a.max_p50_ms, max_peak_mb=a.max_peak_mb,
                    min_cosine=a.min_cosine, max_mj=a.max_mj, max_size_mb=a.max_size_mb)
    d = decide(runs, budget, a.objective)
    print(render(d))
    if a.record:
        print(cli_decide.record_pick(a.record, d, runs))
    if a.json_path:
        write_json_atomic(Path(a.json_path), json.dumps(d.to_dict(), indent=2))
    if a.html_path:
        from edgeship.profiling.html import write_html
        from edgeship.profiling.predict import html_section, load_predictions

        extra = [html_section(load_predictions(a.predictions))] if a.predictions else []
        write_html(runs, Path(a.html_path), d, extra)
        print(f"HTML report: {a.html_path}")
    return 0 if d.pick is not None else EXIT_FAIL


def cmd_export(a: argparse.Namespace) -> int:
    from edgeship.llm_models import is_causal_lm
    from edgeship.pipeline import export

    with quiet.for_command("export", a.verbose) as q:
        say = q.say if not a.quiet else (lambda m: None)
        if is_causal_lm(a.model):
            res = cli_llm.export_llm_cmd(a, say)
        else:
            if flags := cli_llm.llm_only_flags(a):
                raise ConfigError(f"{' '.join(flags)}: for causal LMs only; {a.model} is not one (its config names no "
                                  "*ForCausalLM architecture): drop the flag(s)")
            res = export(a.model, target=a.target, out=a.output, formats=a.format or None, recipes=a.quant or None,
                         calibration=a.calibration, heldout=a.heldout, overwrite=a.overwrite,
                         allow_degraded=a.allow_degraded, task=a.task, seq_len=a.seq_len, checkpoint=a.checkpoint,
                         log=say, jobs=_jobs(a.jobs))
    print(res.summary())
    print(f"bundle: {res.bundle}  ({res.seconds:.1f} s)")
    return 0


def cmd_targets(a: argparse.Namespace) -> int:
    from edgeship.profiling.report import table
    from edgeship.targets import get_profile, list_profiles

    if a.action == "show":
        if not a.name:
            raise ConfigError("edgeship targets show NAME")
        p = get_profile(a.name)
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    rows = [[p.name, p.display_name, p.arch, str(p.cores), ", ".join(p.formats), p.recipes[0], p.power.meter,
             ", ".join(a.name for a in p.accelerators) or "-"] for p in list_profiles()]
    print(table(rows, ["name", "device", "arch", "cores", "formats", "first recipe", "meter", "accelerators"]))
    return 0


def cmd_formats(a: argparse.Namespace) -> int:
    from edgeship.exporters import support_matrix
    from edgeship.profiling.report import table

    print(table([list(r) for r in support_matrix()], ["format", "recipe", "how"]))
    return 0


def cmd_pack(a: argparse.Namespace) -> int:
    from edgeship.bundle import pack

    dest = pack(a.bundle, a.output, overwrite=a.overwrite, pubkey=a.pubkey)
    print(f"packed {a.bundle} -> {dest} ({dest.stat().st_size / 2**20:.1f} MB)")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from edgeship.bundle import opened

    with opened(a.bundle) as root:
        return _inspect(root)


def _inspect(root: Path) -> int:
    from edgeship.manifest import load_bundle
    from edgeship.profiling.report import table

    b = load_bundle(root, verify=True)
    if b.manifest.llm is not None:
        return cli_llm.inspect_llm(b)
    m = b.manifest
    print(f"model {m.model['name']} ({m.model['task']}), target {m.target['name']}, edgeship {m.edgeship_version}")
    print("inputs:  " + ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in m.inputs))
    print("outputs: " + ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in m.outputs))
    rows = []
    for art in m.artifacts:
        f = art.fidelity
        pad = art.runtime.get("input_padding") or {}
        pad_cell = f"{pad.get('mode', '-')}{' ' + str(pad['length']) if pad.get('length') else ''}"
        rows.append([art.key, art.path, f"{art.size_bytes / 2**20:.1f}", f"{f.mean_cosine:.4f}" if f else "-",
                     str(len(art.kept_layers)), pad_cell, art.sha256[:12]])
    print(table(rows, ["artifact", "path", "MB", "mean cos", "kept hi-prec", "pad input", "sha256"]))
    for art in m.artifacts:
        for key in ("delegation", "fallbacks", "signatures"):
            if key in art.details:
                print(f"\n{art.key} {key}:")
                print(json.dumps(art.details[key], indent=2)[:4000])
        if isinstance(art.details.get("npu"), dict):
            from edgeship.profiling.backends.qnn import coverage_lines

            print(f"\n{art.key} NPU (compiled for the Hexagon HTP):")
            print("\n".join(coverage_lines(art.details["npu"])))
        for w in art.warnings:
            print(f"{art.key}: warning: {w}")
    print("checksums: all artifacts verified")
    from edgeship.signing import describe

    print(describe(b.root))
    return 0


def cmd_quickstart(a: argparse.Namespace) -> int:
    from edgeship.models import default_model_dir

    if a.llm:
        return cli_llm.quickstart_llm(a)
    from edgeship.pipeline import export
    from edgeship.profiling import report
    from edgeship.profiling.results import RunConfig
    from edgeship.profiling.runner import profile

    out = Path(a.output)
    print(f"edgeship quickstart: all-MiniLM-L6-v2 -> {a.target} -> {out}", flush=True)
    with quiet.for_command("quickstart", a.verbose) as q:
        export(default_model_dir(), target=a.target, out=out, formats=a.format or None,
               recipes=a.quant or None, overwrite=True, log=q.brief, jobs=_jobs(a.jobs))
        # no export table here: the one line per artifact above has its size and fidelity, and the profile table
        # below repeats both (`edgeship inspect` shows the full table)
        cfg = RunConfig(runs=a.runs, min_seconds=a.min_seconds, energy="auto", progress=True)
        prof = profile(out, config=cfg, json_path=out.with_name(out.name + "-profile.json"))
    print()
    print(report.render(prof))
    print(f"\nbundle: {out}   results: {out.with_name(out.name + '-profile.json')}")
    return 0 if prof.ok else EXIT_FAIL


def cmd_keygen(a: argparse.Namespace) -> int:
    from edgeship.signing import key_id, keygen, load_public_key

    priv, pub = keygen(a.output, overwrite=a.overwrite)
    print(f"private key: {priv} (keep it secret; it signs bundles)")
    print(f"public key:  {pub} (key {key_id(load_public_key(pub))}; give it to whoever verifies)")
    return 0


def cmd_sign(a: argparse.Namespace) -> int:
    from edgeship.signing import sign

    dest = sign(a.bundle, a.key)
    print(f"signed {a.bundle}: {dest}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from edgeship.bundle import check_signed

    check_signed(a.bundle, a.pubkey)
    print(f"{a.bundle}: signature valid ({a.pubkey}); every file matches what was signed")
    return 0


def _add_signing_commands(sub: Any) -> None:
    k = sub.add_parser("keygen", help="make an ed25519 key pair for signing bundles")
    k.add_argument("-o", "--output", required=True, help="private key file to write (the public key goes to OUTPUT.pub)")
    k.add_argument("--overwrite", action="store_true")
    k.set_defaults(fn=cmd_keygen)
    s = sub.add_parser("sign", help="sign a bundle (ed25519 over the sha256 of every file)")
    s.add_argument("bundle")
    s.add_argument("--key", required=True, help="PEM ed25519 private key (edgeship keygen)")
    s.set_defaults(fn=cmd_sign)
    v = sub.add_parser("verify", help="check a bundle's (or .zip's) signature with a public key")
    v.add_argument("bundle")
    v.add_argument("--pubkey", required=True, help="PEM ed25519 public key of the signer")
    v.set_defaults(fn=cmd_verify)


def cmd_device(a: argparse.Namespace) -> int:
    from edgeship import virtual_pi

    return int(virtual_pi.cli(a.name, a.action, Path(a.workdir) if a.workdir else None, a.port))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeship", description="Export models for edge devices and measure them there.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("export", help="export a model into a checked, quantized bundle")
    e.add_argument("model", help="Hugging Face model directory, or package.module:factory")
    e.add_argument("--target", required=True, help="target profile name (edgeship targets) or a .toml file")
    _add_plan_args(e)
    e.add_argument("--calibration", help="calibration data: .txt/.jsonl texts, or .npy/.npz arrays")
    e.add_argument("--heldout", help="held-out inputs for the fidelity check (same file kinds as --calibration)")
    e.add_argument("-o", "--output", required=True, help="bundle directory to create")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_jobs_arg(e)
    e.add_argument("--allow-degraded", action="store_true", help="keep artifacts below the fidelity floor (marked)")
    e.add_argument("--task", help="override the task detected from config.json: "
                   + listing(t for t in TASKS if TASKS[t].inputs != "custom"))
    e.add_argument("--seq-len", type=int, help="sequence length for text models (default: the profile's)")
    e.add_argument("--checkpoint", help="state_dict for a factory model (loaded with weights_only=True)")
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_verbose(e)
    cli_llm.add_export_args(e)
    e.set_defaults(fn=cmd_export)

    pr = sub.add_parser("profile", help="run and measure a bundle or model file")
    _add_profile_args(pr)
    cli_llm.add_profile_args(pr)
    pr.set_defaults(fn=cmd_profile)
    cli_llm.add_chat_parser(sub)

    t = sub.add_parser("targets", help="list or show target profiles")
    t.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    t.add_argument("name", nargs="?")
    t.set_defaults(fn=cmd_targets)

    f = sub.add_parser("formats", help="the format x recipe support matrix")
    f.set_defaults(fn=cmd_formats)

    pk = sub.add_parser("pack", help="pack a bundle into one .zip for an app")
    pk.add_argument("bundle")
    pk.add_argument("-o", "--output")
    pk.add_argument("--overwrite", action="store_true")
    pk.add_argument("--pubkey", help="refuse a bundle this key did not sign (default: $EDGESHIP_PUBKEY)")
    pk.set_defaults(fn=cmd_pack)

    r = sub.add_parser("report", help="compare results side by side and pick what meets a budget")
    r.add_argument("results", nargs="+", help="results JSON files from edgeship profile --json")
    r.add_argument("--max-p99-ms", type=float)
    r.add_argument("--max-p50-ms", type=float)
    r.add_argument("--max-peak-mb", type=float)
    r.add_argument("--min-cosine", type=float, help="minimum mean cosine vs PyTorch")
    r.add_argument("--max-mj", type=float, help="maximum energy per inference in mJ")
    r.add_argument("--max-size-mb", type=float)
    r.add_argument("--objective", default="latency", help="what the pick minimises: latency, energy, size, memory "
                   "(LLM results: latency = highest decode tok/s, ttft, memory, energy)")
    r.add_argument("--json", dest="json_path")
    r.add_argument("--html", dest="html_path")
    cli_decide.add_record_arg(r)
    cli_decide.add_report_predictions_arg(r)
    cli_llm.add_report_args(r)
    r.set_defaults(fn=cmd_report)
    cli_decide.add_predict_parser(sub)

    i = sub.add_parser("inspect", help="verify a bundle (directory or .zip) and show its manifest")
    i.add_argument("bundle")
    i.set_defaults(fn=cmd_inspect)

    q = sub.add_parser("quickstart", help="export + profile the embedded all-MiniLM-L6-v2")
    q.add_argument("--target", default="raspberry-pi-5")
    q.add_argument("-o", "--output", default="edgeship-quickstart")
    _add_jobs_arg(q)
    _add_plan_args(q)
    _add_run_length_args(q)
    _add_verbose(q)
    q.add_argument("--llm", action="store_true", help="the embedded LLM instead: SmolLM2-135M-Instruct (needs [llm])")
    q.set_defaults(fn=cmd_quickstart)

    d = sub.add_parser("device", help="manage the virtual arm64 Raspberry Pi")
    d.add_argument("name", choices=["virtual-pi"])
    d.add_argument("action", choices=["up", "down", "status"])
    d.add_argument("--workdir", help="where the rootfs lives (default ~/.cache/edgeship/virtual-pi)")
    d.add_argument("--port", type=int, default=0, help="sshd port on 127.0.0.1 (default: a free one)")
    d.set_defaults(fn=cmd_device)
    _add_signing_commands(sub)
    cli_history.add_parsers(sub)
    cli_farm.add_parsers(sub)
    return p


def _version() -> str:
    from edgeship import __version__

    return f"edgeship {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("EDGESHIP_DEBUG"))
    try:
        return int(args.fn(args))
    except EdgeshipError as e:
        if debug:
            raise
        print(f"edgeship: error: {e}", file=sys.stderr)
        return EXIT_FAIL if not isinstance(e, ConfigError) else EXIT_USAGE
    except KeyboardInterrupt:
        print("edgeship: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
