"""lora_edu.teaching.sanity and its script code/lora.py: the appendix report passes, and says so.

The script runs as a subprocess from the repository root, as a reader would run it. A
deliberately broken lora_edu (patched inside that subprocess only) must make it fail
loudly, naming the invariant that broke.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_edu import Check, run_sanity_checks

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "code" / "lora.py"
LABELS = list("abcdef")


def run_script(*python_args, timeout=120):
    return subprocess.run([sys.executable, *python_args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def report_lines(stdout):
    return [line for line in stdout.splitlines() if re.match(r"\[[a-z]\] ", line)]


# ------------------------------------------------------------------ in process
def test_all_checks_pass_with_default_settings():
    checks = run_sanity_checks()
    assert [c.label for c in checks] == LABELS
    assert all(isinstance(c, Check) for c in checks)
    failed = [c.line() for c in checks if not c.passed]
    assert not failed, failed


@pytest.mark.parametrize("in_features, out_features, r, alpha", [(16, 8, 2, 4), (10, 30, 5, 1.5)])
def test_checks_pass_at_other_sizes_and_report_the_count(in_features, out_features, r, alpha):
    checks = {c.label: c for c in run_sanity_checks(in_features, out_features, r, alpha, seed=3)}
    assert all(c.passed for c in checks.values())
    assert f"trainable params = {r * (in_features + out_features)} " in checks["d"].text
    assert f"{alpha / r:.4f}" in checks["e"].text and f"{alpha / math.sqrt(r):.4f}" in checks["e"].text


def test_check_line_format():
    assert Check("c", True, "x = 1").line() == "[c] x = 1  OK"
    assert Check("c", False, "x = 1").line() == "[c] x = 1  FAILED"


# ------------------------------------------------------------------ the script
@pytest.fixture(scope="module")
def script_run():
    return run_script(str(SCRIPT))


def test_script_exits_zero_and_prints_six_ok_lines(script_run):
    assert script_run.returncode == 0, script_run.stderr
    lines = report_lines(script_run.stdout)
    assert [line[1] for line in lines] == LABELS
    assert all(line.rstrip().endswith("OK") for line in lines)
    assert "FAILED" not in script_run.stdout + script_run.stderr


def test_script_reports_the_count_and_the_scalings(script_run):
    lines = {line[1]: line for line in report_lines(script_run.stdout)}
    # the settings the script passes to run_sanity_checks, read from its source
    settings = {k: int(v) for k, v in re.findall(r"\b(in_features|out_features|r|alpha)=(\d+)", SCRIPT.read_text())}
    assert sorted(settings) == ["alpha", "in_features", "out_features", "r"]
    r, alpha = settings["r"], settings["alpha"]
    assert re.search(rf"trainable params = {r * (settings['in_features'] + settings['out_features'])}\b", lines["d"])
    assert f"{alpha / r:.4f}" in lines["e"] and f"{alpha / math.sqrt(r):.4f}" in lines["e"]


def test_script_ends_with_a_summary_line(script_run):
    last = script_run.stdout.strip().splitlines()[-1]
    assert not last.startswith("[")
    assert last.startswith(f"all {len(LABELS)} ") and last.endswith("passed")


BREAKAGES = {
    # a wrong scaling formula, seen by check [e] only
    "scaling": ("import lora_edu.teaching.sanity as s; s.lora_scaling = lambda alpha, r, rslora=False: alpha / (r + 1)",
                {"e"}),
    # B initialised non-zero: the layer no longer starts as the base ([a]) and neither does DoRA ([f])
    "b_init": ("import torch, lora_edu.methods.lora as L; reset = L.LoRALinear.reset_lora_parameters_\n"
               "def bad(self):\n    reset(self)\n    torch.nn.init.constant_(self.lora_B, 0.01)\n"
               "L.LoRALinear.reset_lora_parameters_ = bad",
               {"a", "f"}),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_script_fails_and_names_the_broken_invariant(breakage):
    patch, broken = BREAKAGES[breakage]
    program = f"{patch}\nimport runpy\nrunpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    result = run_script("-c", program)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line[1]: line for line in report_lines(result.stdout)}
    assert sorted(lines) == LABELS  # the report is still printed in full
    for label, line in lines.items():
        assert line.rstrip().endswith("FAILED" if label in broken else "OK"), line
    for label in broken:
        assert f"[{label}]" in result.stderr
    assert "passed" not in result.stdout
