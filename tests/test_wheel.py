"""The built wheel works outside the repository: every console script answers --help from a fresh
venv, and the package data (the NIAH haystack) is inside the wheel."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_console_scripts_from_the_wheel_outside_the_repo(tmp_path):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), ROOT], check=True, cwd=tmp_path, timeout=300, env=env)
    (wheel,) = dist.glob("megatron_ultralong-*.whl")
    # A fresh venv; the dependencies (torch, megatron-core, transformers...) come from this
    # interpreter's site-packages, read AFTER the venv's own, so the wheel's copy of the package wins.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = str(venv / "bin" / "python")
    # Install before the dependency path is added: pip would otherwise see a development install of
    # this package there and skip the wheel.
    subprocess.run([sys.executable, "-m", "pip", "--python", vpy, "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, timeout=300, cwd=tmp_path, env=env)
    purelib = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "zz_deps.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    where = subprocess.run(
        [vpy, "-c", "import megatron_ultralong, importlib.resources as r; print(megatron_ultralong.__file__); "
                    "print(r.files('megatron_ultralong.eval').joinpath('data/essays.txt').is_file())"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=env).stdout.split()
    assert where[0].startswith(purelib) and where[1] == "True", where
    # All --help calls at once: most of the time is importing torch / megatron-core.
    procs = {name: subprocess.Popen([str(venv / "bin" / name), "--help"], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in scripts}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "usage:" in out, f"{name}: rc={proc.returncode}\n{err[-2000:]}"
