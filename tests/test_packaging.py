"""The installed package carries what the chapters need: Colab installs lora_edu with pip,
without the rest of the repository, so stored results and the C++ source must be inside it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_stored_results_and_the_cpp_kernel(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    shutil.copytree(ROOT / "lora_edu", source / "lora_edu", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("lora_edu-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"lora_edu/data/{p.name}" for p in (ROOT / "lora_edu" / "data").glob("*.json")}
    expected |= {f"lora_edu/quant/csrc/{p.name}" for p in (ROOT / "lora_edu" / "quant" / "csrc").glob("*.cpp")}
    assert len(expected) >= 3 and expected <= names, expected - names


def test_stored_results_load_by_name():
    from lora_edu.data import load
    assert load("memory_gpu")["runs"] and load("scaling_sweeps")["runs"]
    import pytest
    with pytest.raises(ValueError, match="there are: dora_speed, dora_speed_cpu, dora_sweeps, memory_gpu, scaling_sweeps"):
        load("sweeps")
