"""The README's Python API example runs as shipped and reports numbers that mean something.

It is run as a user would (a fresh interpreter from the repository root), with one epoch
of each training so that it takes seconds.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_python_api_example_trains_then_attacks():
    out = subprocess.run([sys.executable, "examples/python_api.py", "--epochs", "1", "--attack-epochs", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    accuracy = re.search(r"^test accuracy ([\d.]+) \(int8 features, noise 0\.1, 1 epochs\)$", out.stdout, re.M)
    attack = re.search(r"^inversion attack on (\d+) test images: MSE ([\d.]+)  SSIM ([\d.-]+)  PSNR ([\d.]+) dB$",
                       out.stdout, re.M)
    assert accuracy and attack, out.stdout
    assert float(accuracy[1]) > 0.3  # ten classes: chance is 0.1; one epoch reaches ~0.6
    n, mse, ssim, psnr = int(attack[1]), float(attack[2]), float(attack[3]), float(attack[4])
    assert n == 359  # every test image of digits' default split
    # Even one epoch of the noise-aware inverse network recovers the strokes (SSIM ~0.8 measured).
    assert 0 < mse < 0.05 and 0.5 < ssim <= 1
    # PSNR is averaged per image, so it is at least the PSNR of the mean MSE (-log is convex);
    # the margins are the printed digits' rounding.
    assert psnr >= -10 * math.log10(mse + 5e-5) - 5e-3
