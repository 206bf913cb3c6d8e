"""Packaging: what setup.py installs, checked from its own arguments (fast), and a wheel
built, installed in a fresh virtual environment and run from outside the repository
(slow: it installs the dependencies).

Fast: every subpackage and every config file is in the wheel, the version is written
once, the console script and each verb resolve, every third-party import of the package
is a declared dependency, and `--config configs/...` finds the package's configs from
any directory."""
import ast
import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import pytest
import setuptools

import robust_admm
from robust_admm import cli
from robust_admm.experiments import config_files

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_args(monkeypatch_module):
    """The keyword arguments setup.py gives `setuptools.setup`, run in the repository."""
    seen = {}
    monkeypatch_module.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch_module.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return seen


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _wheel_files(args) -> set:
    """The .py files the wheel holds, as paths in the repository, from `packages`,
    `package_dir` and `package_data` (what setuptools' build_py copies)."""
    files = set()
    for package in args["packages"]:
        where = args.get("package_dir", {}).get(package, package.replace(".", "/"))
        base = ROOT / where
        files |= {p for p in base.glob("*.py")}
        for pattern in args.get("package_data", {}).get(package, []):
            files |= set(base.glob(pattern))
    return {str(p.relative_to(ROOT)) for p in files}


def test_the_wheel_holds_every_module_and_config(setup_args):
    sources = {str(p.relative_to(ROOT)) for d in ("robust_admm", "configs")
               for p in (ROOT / d).rglob("*.py")}
    missing = sorted(sources - _wheel_files(setup_args))
    assert not missing, f"not in the wheel: {missing}"
    assert setup_args["package_dir"] == {"robust_admm.configs": "configs"}


def test_the_version_is_defined_once(setup_args):
    assert setup_args["version"] == robust_admm.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", robust_admm.__version__)
    holders = [str(p.relative_to(ROOT)) for p in [ROOT / "setup.py", *ROOT.glob("*.cfg"),
                                                  *ROOT.glob("*.toml"),
                                                  *(ROOT / "robust_admm").rglob("*.py")]
               if robust_admm.__version__ in p.read_text(encoding="utf-8")]
    assert holders == ["robust_admm/__init__.py"]


def test_the_console_script_and_each_verb_resolve(setup_args):
    scripts = setup_args["entry_points"]["console_scripts"]
    assert scripts == ["robust-admm = robust_admm.cli:main"]
    module, _, attribute = scripts[0].split(" = ")[1].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    for verb in cli.VERBS:  # each entry point has its `run` (read, not imported: cheap)
        spec = importlib.util.find_spec(f"robust_admm.{verb}")
        tree = ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
        assert "run" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, verb


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_third_party_import_is_a_dependency(setup_args):
    """The top-level modules the package imports, outside the standard library, belong to
    a distribution that install_requires (or an extra) names, so a fresh environment has
    them; the installed dependencies' own names are read with importlib.metadata."""
    declared = {_requirement_name(r) for r in setup_args["install_requires"]}
    extras = {_requirement_name(r) for rs in setup_args["extras_require"].values()
              for r in rs}
    providers = importlib.metadata.packages_distributions()
    imported = set()
    for path in [*(ROOT / "robust_admm").rglob("*.py"), *(ROOT / "configs").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    third_party = sorted(imported - set(sys.stdlib_module_names) - {"robust_admm", "configs"})
    # A dependency's own dependency (jaxlib of jax, onnx of the onnx extra's jax2onnx)
    # counts: it is installed with the one declared.
    allowed = _transitive(declared | extras)
    undeclared = []
    for module in third_party:
        names = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not names & allowed:
            undeclared.append((module, sorted(names)))
    assert not undeclared, undeclared


def _transitive(declared: set) -> set:
    """The distributions the declared ones require, recursively (as installed here)."""
    seen, todo = set(), list(declared)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_config_paths_find_the_packages_configs_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = ROOT / "configs"
    assert config_files.bundled_dir() == here
    assert config_files.resolve("configs/digits.py:smoke") == f"{here / 'digits.py'}:smoke"
    assert config_files.resolve("configs/studies/digits_width.py") == \
        str(here / "studies" / "digits_width.py")
    for kept in ("configs/nope.py", "mine.py:cpu", "/abs/configs/digits.py"):
        assert config_files.resolve(kept) == kept
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "digits.py").write_text("")  # a file of the user's: theirs
    assert config_files.resolve("configs/digits.py:smoke") == "configs/digits.py:smoke"
    (tmp_path / "configs" / "digits.py").unlink()
    argv = ["train", "--config", "configs/mnist.py:cpu", "--config.seed=3", "--workdir", "w"]
    assert config_files.resolve_argv(argv) == [
        "train", "--config", f"{here / 'mnist.py'}:cpu", "--config.seed=3", "--workdir", "w"]
    assert config_files.resolve_argv(["t", "--config=configs/digits.py"]) == \
        ["t", f"--config={here / 'digits.py'}"]


def _run(args, cwd, timeout=900, env=None, codes=(0,)):
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=env)
    assert out.returncode in codes, f"{args}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_a_built_wheel_installs_and_runs_in_a_fresh_environment(tmp_path):
    """`pip wheel .`, a new venv, the wheel installed with its dependencies; from a
    directory outside the repository: the import, each console script's --help, and the
    offline quick start's smoke run to its summary; then `pip install .` over it (the
    dependencies come from the package index: minutes)."""
    wheels, venv, away = tmp_path / "wheels", tmp_path / "venv", tmp_path / "away"
    away.mkdir()
    # Built from a copy: the build writes build/ and an .egg-info into the source tree.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", "runs", ".venv", ".hypothesis",
        ".pytest_cache"))
    # Nothing of the checkout on the path (PYTHONPATH would show pip the source package).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w",
          str(wheels)], cwd=tmp_path, env=env)
    (wheel,) = wheels.glob("robust_admm-*.whl")
    assert wheel.name.startswith(f"robust_admm-{robust_admm.__version__}-")
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=env)
    python, script = venv / "bin" / "python", venv / "bin" / "robust-admm"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path, env=env)
    printed = _run([str(python), "-c", "import robust_admm; print(robust_admm.__file__, "
                    "robust_admm.__version__, robust_admm.autoattack, robust_admm.trades)"],
                   cwd=away, env=env)
    assert str(venv) in printed and robust_admm.__version__ in printed
    assert "usage: robust-admm VERB" in _run([str(script), "--help"], cwd=away, env=env)
    for verb in cli.VERBS:
        shown = _run([str(script), verb, "--help"], cwd=away, env=env)
        assert f"robust-admm {verb}" in shown and "--helpfull" in shown, verb
    _run([str(script), "train", "--config", "configs/digits.py:smoke", "--workdir", "run"],
         cwd=away, env=env)
    assert (away / "run" / "summary.json").is_file()
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
          str(source)], cwd=tmp_path, env=env)
    assert robust_admm.__version__ in _run(
        [str(python), "-c", "import robust_admm; print(robust_admm.__version__)"],
        cwd=away, env=env)
