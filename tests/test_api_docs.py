"""docs/api.md names every public name of `robust_admm` and of its public modules
(`compression`, `objectives`), with a heading for each top-level one, and the names it
shows are importable."""
import pathlib
import re

import pytest

import robust_admm
import robust_admm.compression as compression

DOC = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


def test_every_public_name_has_a_heading():
    headings = re.findall(r"^### `robust_admm\.(\w+)", DOC, re.M)
    public = [n for n in robust_admm.__all__ if n != "__version__"]
    assert sorted(headings) == sorted(public)
    for name in public:
        assert getattr(robust_admm, name) is not None


@pytest.mark.parametrize("module", [compression, robust_admm.objectives],
                         ids=["compression", "objectives"])
def test_every_name_of_the_public_modules_is_named(module):
    missing = [n for n in module.__all__ if not re.search(rf"\b{n}\b", DOC)]
    assert not missing, missing
