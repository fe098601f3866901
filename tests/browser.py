"""Headless Chromium for the report tests: load a page, run a probe script in it, read its answer.

No driver library: Chromium's own ``--dump-dom`` prints the DOM after the page's scripts ran
(``--virtual-time-budget`` lets it finish loading, images included). The probe is appended to a
copy of the page; it writes its findings as JSON into a ``<pre id="eq-probe">``, which the dumped
DOM carries back. ``screenshot`` saves what a person would see.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "EQ_REQUIRE_BROWSER"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars", "--mute-audio")


def chromium() -> str:
    """The Chromium executable; skips the test without one, or fails it where ``EQ_REQUIRE_BROWSER``
    is set (CI), so the browser test cannot silently not run there."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    reason = "no Chromium on PATH (Debian: apt-get install chromium) to load the HTML report in"
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason}, and {REQUIRE_ENV} is set", pytrace=False)
    pytest.skip(reason)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # A profile of its own per call: parallel test workers must not share one.
    profile = cwd / f".chromium-profile-{os.getpid()}"
    command = [chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def probe(page: Path, script: str, *, workdir: Path) -> dict[str, Any]:
    """Load ``page`` in Chromium, run ``script`` (JS whose last statement sets ``window.eqProbe``
    to a JSON-able value, possibly in a promise's callback) after the load event, and return it."""
    source = page.read_text(encoding="utf-8")
    wrapper = (
        "<script>window.addEventListener('load', function(){ Promise.resolve().then(function(){"
        f"{script}"
        "}).then(function(){ var out = document.createElement('pre'); out.id = 'eq-probe';"
        " out.textContent = JSON.stringify(window.eqProbe); document.body.appendChild(out); }); });</script>"
    )
    copy = workdir / f"probe-{page.name}"
    copy.write_text(source.replace("</body>", wrapper + "</body>"), encoding="utf-8")
    result = _run(["--virtual-time-budget=15000", "--window-size=1400,1000", "--dump-dom", copy.as_uri()], workdir)
    found = re.search(r'<pre id="eq-probe">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"the probe did not report (exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, target: Path, *, height: int = 1800) -> Path:
    """A PNG of the page's first ``height`` pixels at 1400 px wide."""
    result = _run(["--virtual-time-budget=5000", f"--window-size=1400,{height}", f"--screenshot={target}", page.as_uri()], target.parent)
    assert target.is_file(), result.stderr[-2000:]
    return target
