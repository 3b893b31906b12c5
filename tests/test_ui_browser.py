"""The first screen of `vit-search ui` in a real browser: headless Chromium loads the printed address
from a real MLflow UI server and the rendered page lists the study's trial runs, flat, by name."""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from vit_search.search.run import run_search
from vit_search.spec import load_spec

from test_study_runs import tiny_study
from test_ui import start_ui, wait_for_address

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: the browser test needs Debian's chromium "
                                             "(apt-get install -y chromium; .ci/run installs it where it can)")
@pytest.mark.slow
def test_the_first_screen_lists_the_studys_trials_by_name(tmp_path, monkeypatch, write_spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = tiny_study(tmp_path, "browsed")
    raw["search"]["n_trials"] = 2
    raw["tracking"]["experiment"] = "browser-experiment"
    study = run_search(load_spec(raw), progress=False).study
    import yaml

    spec = write_spec(yaml.safe_dump(raw))
    proc = start_ui(spec, "--port", "0")
    try:
        address = wait_for_address(proc)
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
                              address], capture_output=True, text=True, timeout=300).stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    for trial in study.get_trials():
        assert f"trial {trial.number} · depth {trial.params['model.depth']}" in dom, dom[-3000:]
    assert "browsed<" not in dom, "the parent run is listed"  # the trials alone, not their parent folding them
