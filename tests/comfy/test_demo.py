"""The README's demo command runs end to end on the reference model (a short run of it)."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def test_demo_prints_quality_and_speed_and_writes_the_panels(tmp_path):
    out = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, "-m", "harness.demo", "--batch", "2", "--steps", "8", "--repeats", "1",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for start in ("full compute, 8 steps", "HyCa N=", "fewer steps (", "block computations:"):
        assert any(line.startswith(start) for line in lines), result.stdout
    assert "Amdahl" in result.stdout and " dB" in result.stdout
    assert "torchaudio" not in result.stdout + result.stderr  # ComfyUI's audio warning is not the demo's
    panels = Image.open(out)
    assert panels.width > 4 * panels.height > 0  # four panels side by side
