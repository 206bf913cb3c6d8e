"""The `robust-admm VERB` command and `python -m robust_admm VERB`: one dispatcher over the
entry points, each with absl flags."""
import subprocess
import sys

import pytest

from helpers import ROOT
from robust_admm import cli


def test_an_unknown_verb_is_refused_naming_the_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["robust-admm", "trian"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown verb 'trian'" in err and "train, eval, export, study, report, shards" in err


def test_no_verb_prints_the_usage_and_fails(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["robust-admm"])
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert all(f"  {verb}" in out for verb in cli.VERBS)


@pytest.mark.parametrize("verb,flag", [("train", "--workdir"), ("export", "--out")])
def test_a_verb_runs_its_entry_point_with_its_flags_and_help(verb, flag):
    r = subprocess.run([sys.executable, "-m", "robust_admm", verb, "--helpshort"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"`python -m robust_admm.{verb}`" in r.stdout  # the verb's own docstring
    assert flag in r.stdout


@pytest.mark.parametrize("argv, asks", [
    (["p", "--help"], True), (["p", "-h"], True), (["p", "--helpfull"], True),
    (["p", "--helpshort=true"], True), (["p", "--workdir", "x"], False),
    (["p", "--", "--help"], False), (["p", "--workdir=--help-me"], False)])
def test_a_help_request_is_told_from_other_arguments(argv, asks):
    assert cli.asks_help(argv) is asks


def test_the_report_verb_names_a_folder_that_holds_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "robust_admm", "report", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"{tmp_path} holds neither a study (study.json) nor a run" in r.stderr
