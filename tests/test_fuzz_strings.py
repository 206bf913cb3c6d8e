"""Fuzzed strings: rules, programs, stages, epsilons, attack lists, prune ratios and
model kwargs, each parsed to a correct result (checked against a reference) or refused
with a ValueError naming the field (tests/fuzz_support.py says what is checked)."""
import math
import re

import ml_collections
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_support import fuzz_settings, mutated_text, outcome
from robust_admm.attacks import suite
from robust_admm.compression.projections import check_spec
from robust_admm.compression.rules import comma_list, parse_ratios, parse_rules
from robust_admm.experiments.config_base import base_config
from robust_admm.experiments.evaluate import parse_epsilons
from robust_admm.models import parse_kwargs
from robust_admm.training.program import parse_program, phases_to_run

RULES = ["conv*=filter:0.5, fc1=irregular:0.9+quantize:4, fc2=nm:2:4, conv2=quantize:2",
         "fc*=irregular:w2", "block*/conv2=column:0.25+quantize:1", "conv1=channel:0.5"]


@given(mutated_text(RULES, alphabet=":=,+.w-e0123456789 naifq*/"))
@example("fc1=irregular:nan")  # a ratio no projection takes
@example("fc1=irregular:w-3")  # a width below 1
@example("fc1=quantize:0")  # bits outside [1, 16]
@example("fc1=nm:5:4")  # N above M
@fuzz_settings()
def test_rules(text):
    out = outcome(lambda: parse_rules(text), ["rule"])
    if out is None:
        return
    assert list(out) == [i.partition("=")[0].strip() for i in comma_list(text)]
    for pattern, spec in out.items():
        body = {k: v for k, v in spec.items() if k not in ("kind", "width")}
        if "width" in spec:  # a width: resolved against the model at the start
            assert isinstance(spec["width"], int) and spec["width"] >= 1, spec
            body["ratio"] = 0.0
        check_spec(spec["kind"], body)  # every value is one the projections take


@given(mutated_text(["conv1=0.8,fc*=0.9", "fc1=0.5"], alphabet="=,.e0123456789-nai"))
@example("conv1=nan")
@fuzz_settings(0.5)
def test_prune_ratios(text):
    out = outcome(lambda: parse_ratios(text), ["prune.ratios"])
    if out is not None:
        assert all(0 <= r < 1 for r in out.values()), out


@given(mutated_text(["0,0.1,0.3", "0.0314", "8e-3,1"], alphabet=",.e-+0123456789 nainf"))
@example("nan")  # not an epsilon
@example("inf")
@example("1e400")  # overflows to inf
@fuzz_settings()
def test_epsilons(text):
    out = outcome(lambda: parse_epsilons(text), ["--epsilons"])
    if out is not None:
        reference = sorted({float(e) for e in text.split(",") if e.strip()})
        assert out == reference and out
        assert all(math.isfinite(e) and e >= 0 for e in out), out


@given(mutated_text(["fgsm,pgd40,aa-standard", "apgd-ce,apgd-t", "pgd7,square,fab-t"],
                    alphabet=",-pgdfsma0123456789 ")
       | st.integers(1, 6000).map(lambda n: "pgd" + "9" * n))
@example("pgd" + "9" * 5000)  # more digits than int() converts
@example("pgd\u0663")  # an Arabic-Indic digit: not a step count
@fuzz_settings()
def test_attack_lists(text):
    out = outcome(lambda: suite.parse(text), ["--attacks", "attack"])
    if out is None:
        return
    labels = [label for label, _ in out]
    assert labels == [s.strip() for s in text.split(",") if s.strip()]
    assert len(set(labels)) == len(labels)
    for _, members in out:
        for name in members:
            m = re.fullmatch(r"pgd([0-9]+)", name)
            assert (m and 1 <= int(m.group(1)) <= 2 ** 31 - 1) or name in (
                "fgsm", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"), name
            suite.make(name, 0.1)  # every name parsed is an attack that can be built


def _program_config(program: str, stages: str = ""):
    c = base_config()
    c.prune.ratios = "conv1=0.5"
    c.program, c.stages = program, stages
    return c


@given(mutated_text(["pretrain,admm,retrain", "pretrain", "admm,retrain"],
                    alphabet=", pretainmd"),
       mutated_text(["", "admm,retrain", "pretrain"], alphabet=", pretainmd"))
@example("pretrain,prune", "")  # a field with a 'kind' that is not a phase's
@example("seed", "")
@fuzz_settings()
def test_programs_and_stages(program, stages):
    config = _program_config(program, stages)
    phases = outcome(lambda: parse_program(config), ["program", ".kind", "phase"])
    if phases is None:
        return
    assert [p.name for p in phases] == comma_list(program)
    assert all(p.kind in ("dense", "admm", "retrain") for p in phases)
    chosen = outcome(lambda: phases_to_run(config, phases), ["stages"])
    if chosen is not None:
        names = [p.name for p in phases]
        order = [names.index(p.name) for p in chosen]
        assert order == list(range(order[0], order[0] + len(order)))
        assert not comma_list(stages) or [p.name for p in chosen] == comma_list(stages)


@given(mutated_text(['{"features": 64}', '{"a": [1, 2], "b": {"c": null}}', ""],
                    alphabet='{}[]":,0123456789 abnul'))
@fuzz_settings(0.5)
def test_model_kwargs(text):
    out = outcome(lambda: parse_kwargs(text), ["model.kwargs"])
    assert out is None or isinstance(out, dict)


def test_config_is_fresh():
    """The configs the tests above parse are the base config's (a guard on the helper)."""
    c = _program_config("pretrain")
    assert isinstance(c, ml_collections.ConfigDict) and c.prune.ratios == "conv1=0.5"
