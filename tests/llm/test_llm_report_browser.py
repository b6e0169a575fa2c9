"""The LLM bundle's HTML report in headless Chromium: TTFT, decode tok/s and mJ/token (marked as an estimate)
from a real profile of the tiny Llama, at phone and desktop widths, nothing fetched."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from edgeship.cli import main

pytestmark = [pytest.mark.browser, pytest.mark.needs_export]
_BROWSER_TESTS = Path(__file__).parents[1] / "browser"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"edgeship_tests_{name}", _BROWSER_TESTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llm_report_in_the_browser(tiny_llama_bundle: Path, browser: Any, tmp_path: Path, shots_dir: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "llm.html"
    rc = main(["profile", str(tiny_llama_bundle), "--artifact", "onnx/int4-weight", "--prompt-lengths", "16,64",
               "--new-tokens", "32", "--energy", "estimate", "--idle-seconds", "0", "--html", str(page)])
    assert rc == 0 and f"HTML report: {page}" in capsys.readouterr().out
    checks = _load("test_report_browser")
    for width in (390, 1300):
        got = checks._check_page(browser, page, width, shots_dir, "llm")
        text = got["text"]
        assert "onnx/int4-weight" in text and "@ 16" in text and "@ 64" in text and "decode tok/s" in text.lower()
        assert "(est.)" in text and "ESTIMATE" in text
        assert browser.eval("document.querySelectorAll('svg polyline').length") >= 2  # token CDF + TTFT curve
