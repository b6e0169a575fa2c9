"""The shared vocabulary (edgeship.vocab) agrees with every registry that is filled by decorators."""

from __future__ import annotations

import pytest

from edgeship import vocab
from edgeship.exporters import EXPORTERS, load_builtin
from edgeship.profiling import backends
from edgeship.profiling.meters import METERS
from edgeship.targets import list_profiles


def test_exporters_and_backends_cover_the_same_formats_with_the_same_suffix() -> None:
    load_builtin()
    for name, spec in vocab.FORMATS.items():
        exp = EXPORTERS.get(name)
        assert exp.format == name and exp.suffix == spec.suffix
        assert backends.SUFFIXES[spec.suffix] == name
        backend = backends.get_backend(name)  # backend modules import their runtime lazily: this is cheap
        assert (backend.format, backend.suffix) == (name, spec.suffix)
        assert f"{backend.__module__}:{backend.__name__}" == spec.backend
    assert set(vocab.FORMATS) <= set(EXPORTERS.keys())
    for name, spec in vocab.DEVICE_FORMATS.items():  # run from bundles only: a backend, no exporter, no suffix lookup
        backend = backends.get_backend(name)
        assert (backend.format, backend.suffix) == (name, spec.suffix) and name not in EXPORTERS.keys()
        assert f"{backend.__module__}:{backend.__name__}" == spec.backend and backends.SUFFIXES[spec.suffix] != name


def test_every_recipe_an_exporter_offers_is_in_the_vocabulary() -> None:
    load_builtin()
    for name in vocab.FORMATS:
        offered = EXPORTERS.get(name).recipes()
        assert offered and set(offered) <= set(vocab.RECIPES), name
        assert "fp32" in offered  # the reference every export starts from


def test_meter_registry_matches_the_vocabulary() -> None:
    assert sorted(METERS.keys()) == sorted(vocab.METERS)


def test_profiles_only_name_known_words() -> None:
    for p in list_profiles():
        assert set(p.formats) <= set(vocab.FORMATS) and set(p.recipes) <= set(vocab.RECIPES)
        assert p.power.meter in vocab.METERS


def test_tasks_table_matches_the_model_loaders() -> None:
    from edgeship.models import TASK_MODELS

    assert set(vocab.TEXT_TASKS) == {"feature-extraction", "sequence-classification", "token-classification"}
    assert all(t.name == k for k, t in vocab.TASKS.items())
    # every task but "custom" (a bare nn.Module) loads from a Hugging Face directory
    assert set(TASK_MODELS) == {t for t, spec in vocab.TASKS.items() if spec.inputs != "custom"}


def test_cli_help_and_defaults_come_from_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from edgeship.cli import main
    from edgeship.profiling.runner import RunConfig

    for argv in (["export", "--help"], ["profile", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also inside hyphenated words

    def squashed(words: str) -> str:
        return "".join(words.split())

    for table in (vocab.FORMATS, vocab.RECIPES, vocab.METERS):
        assert squashed(vocab.listing(table)) in text
    runs = next(f.default for f in dataclasses.fields(RunConfig) if f.name == "runs")
    assert squashed(f"at least this many timed runs (default {runs})") in text


def test_llm_formats_name_the_runtime_that_runs_them_and_known_recipes() -> None:
    from edgeship.exporters.llm_base import LLM_EXPORTER_MODULES
    from edgeship.profiling.llm.runtime import get_llm_runtime

    assert LLM_EXPORTER_MODULES == {n: f.exporter for n, f in vocab.LLM_FORMATS.items()}
    for name, spec in vocab.LLM_FORMATS.items():
        rt = get_llm_runtime(name)  # LLM runtime modules import their library lazily too
        assert rt.format == name and f"{rt.__module__}:{rt.__name__}" == spec.runtime
    assert set(vocab.LLM_RECIPES) <= set(vocab.RECIPES) and "fp32" in vocab.LLM_RECIPES
