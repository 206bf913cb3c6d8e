"""Where `--config` files are found: the configs shipped with the package.

A path that exists is read as given. A path under `configs/` (`configs/digits.py:smoke`,
`configs/studies/digits_width.py`) that does not exist from the working directory names
the package's own configs, so the README's commands run from any directory: the
repository's `configs/` in a source checkout, `robust_admm/configs/` where the package is
installed from a wheel (setup.py ships them there). Any other path is left as it is (a
missing one is then the config flag's own error).
"""
import os
import pathlib

PREFIX = "configs/"
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]  # robust_admm/


def bundled_dir() -> pathlib.Path | None:
    """The directory of the package's configs: robust_admm/configs where installed, the
    checkout's configs/ (next to its setup.py) otherwise; None when neither is there."""
    installed = _PACKAGE / "configs"
    if (installed / "__init__.py").is_file():
        return installed
    checkout = _PACKAGE.parent
    if (checkout / "setup.py").is_file() and (checkout / "configs" / "__init__.py").is_file():
        return checkout / "configs"
    return None


def resolve(value: str) -> str:
    """The config flag's value (`PATH[:preset]`) with a missing `configs/...` PATH replaced
    by the package's own copy, where it has one."""
    path, sep, preset = value.partition(":")
    if os.path.exists(path) or not path.replace(os.sep, "/").startswith(PREFIX):
        return value
    root = bundled_dir()
    if root is None:
        return value
    candidate = root / path[len(PREFIX):]
    return f"{candidate}{sep}{preset}" if candidate.is_file() else value


def resolve_argv(argv: list[str], flag: str = "config") -> list[str]:
    """`argv` with the value of `--flag` (as `--flag=V` or `--flag V`) resolved."""
    out, i = list(argv), 1
    while i < len(out):
        arg = out[i]
        if arg.startswith(f"--{flag}="):
            out[i] = f"--{flag}=" + resolve(arg.split("=", 1)[1])
        elif arg == f"--{flag}" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
            i += 1
        i += 1
    return out
