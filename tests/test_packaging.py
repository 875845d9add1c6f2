"""The wheel as a user gets it: built from the repository offline, installed into a fresh venv, its console
script ``aoi-train`` trains the shipped config ``ndigits`` by name, outside the checkout.

The fresh venv sees the test interpreter's packages (jax, flax, ...) through a ``.pth`` line naming that
interpreter's site-packages, so nothing is downloaded (``pip install --no-deps --no-index``); only the wheel
provides ``aoi_jax``. Building a wheel without network needs setuptools >= 70.1 (or the ``wheel`` package) in
the test interpreter: the ``test`` extra of setup.cfg installs it.
"""

import importlib.metadata
import importlib.util
import pathlib
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from aoi_jax import config
from conftest import subprocess_env
from test_cli import ROOT, TINY

SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "aoi_jax", "configs")


def can_build_wheels() -> bool:
    version = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def run(args, **kwargs):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not can_build_wheels():
        pytest.skip("building a wheel offline needs setuptools >= 70.1 or the wheel package (pip install -e '.[test]')")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:                    # a copy: building writes build/ and *.egg-info next to setup.cfg
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist,
         src])
    (path,) = dist.glob("aoi_jax-*.whl")
    return path


def test_wheel_holds_every_module_the_configs_and_the_commands(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "aoi_jax").rglob("*.py")}
    assert modules <= names, f"not in the wheel (packages of setup.cfg?): {sorted(modules - names)}"
    assert {f"aoi_jax/configs/{name}.py" for name in config.shipped()} <= names
    assert not any(n.startswith(("configs/", "tests/", "benchmarks/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "aoi-train = aoi_jax.commands.train:main" in text
    assert "aoi-evaluate = aoi_jax.commands.evaluate:main" in text
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [x for x in zipfile.ZipFile(wheel).read(metadata).decode().splitlines() if x.startswith("Requires-Dist")]
    assert any("aedat" in x and 'extra == "cifar10dvs"' in x for x in requires)
    assert not any("aedat" in x and "extra ==" not in x for x in requires)      # not needed without CIFAR10-DVS


def test_installed_wheel_trains_a_shipped_config_by_name(wheel, tmp_path, ndigits_dir):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    (purelib,) = [pathlib.Path(p) for p in run([python, "-c", "import site; print(*site.getsitepackages())"]
                                                  ).stdout.split()]
    (purelib / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    env = {k: v for k, v in subprocess_env(JAX_PLATFORMS="cpu", TQDM_DISABLE="1").items() if k != "PYTHONPATH"}
    where = run([python, "-c", "import aoi_jax; print(aoi_jax.__file__)"], cwd=tmp_path, env=env).stdout
    assert pathlib.Path(where.strip()).is_relative_to(venv)
    args = ["--config", "ndigits", "--workdir", "run", "--data-dir", ndigits_dir, "--no-eval"]
    for item in TINY + ["train.batch_size=512"]:                 # 3 steps
        args += ["--set", item]
    proc = run([venv / "bin" / "aoi-train", *args], cwd=tmp_path, env=env)
    assert "epoch   1  loss" in proc.stdout
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "checkpoints").is_dir()
    assert "--workdir" in run([venv / "bin" / "aoi-evaluate", "--help"], cwd=tmp_path, env=env).stdout


def test_config_by_name_or_path():
    assert config.load("ndigits_hard", ["train.epochs=3"]) == config.load(ROOT / "configs" / "ndigits_hard.py",
                                                                          ["train.epochs=3"])
    assert set(config.shipped()) == {p.stem for p in (ROOT / "configs").glob("*.py")}
    with pytest.raises(FileNotFoundError, match=r"'ndigitz' does not exist, nor is it the name of a shipped "
                                                r"config: \['cifar100_qcfs', .*'ndigits', .*'nmnist'\]"):
        config.load("ndigitz")
