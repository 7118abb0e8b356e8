"""The Flax, Haiku and data-parallel examples run (short mode) and report a test accuracy.

The three scripts are compile-bound, so they are started together and checked one by one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("deq_digits_flax.py", "deq_digits_haiku.py", "data_parallel.py", "deq_training.py")
ACCURACY = re.compile(r"test accuracy: (\d+\.\d+)%")


@pytest.fixture(scope="module")
def outputs() -> dict[str, subprocess.CompletedProcess]:
    env = dict(os.environ)
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        ).strip()
    processes = {
        script: subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), "--short"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=EXAMPLES.parent,
        )
        for script in SCRIPTS
    }
    results = {}
    for script, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[script] = subprocess.CompletedProcess(
            process.args, process.returncode, stdout, stderr
        )
    return results


def _output(outputs, script: str) -> str:
    result = outputs[script]
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    assert "did not converge" not in result.stderr, result.stderr
    return result.stdout


@pytest.mark.parametrize("script", ["deq_digits_flax.py", "deq_digits_haiku.py"])
def test_digits_example(outputs, script):
    accuracies = [float(a) for a in ACCURACY.findall(_output(outputs, script))]
    # 20 steps lift it well above chance (10%); about 75% in practice.
    assert len(accuracies) == 1 and 40 <= accuracies[0] <= 100
    # The progress bar shows the backward solve's steps, read from the adjoint-stats probe.
    backward = [int(s) for s in re.findall(r"bwd_steps=(\d+)", outputs[script].stderr)]
    assert backward and all(steps > 0 for steps in backward)


def test_data_parallel_example(outputs):
    output = _output(outputs, "data_parallel.py")
    assert re.search(r"^\d+ devices: ", output, re.M), output
    for mode in ("pmap", "jit + NamedSharding"):
        assert re.search(rf"^{re.escape(mode)}: test accuracy: \d+\.\d+%$", output, re.M), output
    difference = float(re.search(r"max parameter difference pmap vs jit: (\S+)", output)[1])
    assert difference < 1e-3  # the two data-parallel runs train the same model


def test_deq_training_example(outputs):
    """The training benchmark's short mode: its two PhantomGradient runs report their backward
    solve's k − 1 = 4 products (from the probe) and the regularised one its penalty."""
    output = _output(outputs, "deq_training.py")
    lines = dict(re.findall(r"^(phantom(?:, regularised)?): (.*)$", output, re.M))
    assert set(lines) == {"phantom", "phantom, regularised"}, output
    for line in lines.values():
        assert ACCURACY.search(line) and line.endswith("backward steps 4"), line
    assert re.search(r"penalty=\d+\.\d+", outputs["deq_training.py"].stderr)
