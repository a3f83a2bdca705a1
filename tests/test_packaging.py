"""The installed package is one import name, c2seg: a user's own train.py (or slurm, inference, data_prep module)
cannot clash with a stage. Built as a wheel and installed into a fresh venv, as users install it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_one_name_beside_a_stray_train_py(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("c2seg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"c2seg", f"{wheel.name.split('-py')[0]}.dist-info"}
    assert {"c2seg/train/loop.py", "c2seg/slurm/templates/train.sbatch", "c2seg/slurm/local_cluster.sh"} <= set(names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]  # torch & co. of this environment (their .pth files
    (site / "deps.pth").write_text("\n".join(deps) + "\n")   # are not read from there: no editable c2seg leaks in)
    user = tmp_path / "project"
    user.mkdir()
    (user / "train.py").write_text("WHO = 'the user'\n")
    help_ = subprocess.run([venv / "bin" / "c2seg", "--help"], cwd=user, capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "Stages:" in help_.stdout, help_.stderr[-2000:]
    probe = ("import train, c2seg.train.loop, c2seg.data_prep.prep, c2seg.inference.runner, c2seg.slurm.submit\n"
             "print(train.WHO); print(c2seg.train.loop.__file__)")
    out = subprocess.run([venv / "bin" / "python", "-c", probe], cwd=user, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    who, loop = out.stdout.splitlines()
    assert who == "the user" and Path(loop) == site / "c2seg" / "train" / "loop.py"
