"""Method specs (CLI strings), dict round-trips and the registry."""

from __future__ import annotations

import json

import pytest

import lvlm_steer as ls


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("ablate:heads=14.3,14.5,mode=mean", ls.AblateHeads({14: [3, 5]}, mode="mean")),
        ("ablate:mode=constant,value=0.5,heads=2.1", ls.AblateHeads({2: [1]}, mode="constant", value=0.5)),
        ("scale:heads=20.1@2,20.3,gain=3", ls.ScaleHeads({20: {1: 2.0, 3: 3.0}}, gain=3.0)),
        ("scale:heads=1.0,where=image", ls.ScaleHeads({1: {0: 2.0}}, where="image")),
    ],
)
def test_spec_parses_and_round_trips(spec, expected):
    method = ls.parse_spec(spec)
    assert method == expected
    assert ls.parse_spec(method.spec()) == method
    data = json.loads(json.dumps(method.to_dict()))
    assert type(method).from_dict(data) == method


def test_none_and_lists():
    assert ls.parse_spec("none") is None
    assert ls.parse_specs(["none", "ablate:heads=0.1"]) == [ls.AblateHeads({0: [1]})]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ablat:heads=1.2", r"unknown method 'ablat'; valid methods: ablate"),
        ("ablate", r"needs heads"),
        ("ablate:head=1.2", r"no parameter 'head'; valid parameters: heads"),
        ("ablate:heads=1", r"expected layer\.head"),
        ("ablate:heads=1.2,heads=1.3", r"given twice"),
        ("ablate:1.2", r"expected key=value"),
        ("scale:heads=1.2,gain=big", r"cannot read gain='big'"),
        ("none:x=1", r"'none' takes no parameters"),
    ],
)
def test_bad_specs_name_the_fix(spec, message):
    with pytest.raises(ls.MethodSpecError, match=message):
        ls.parse_spec(spec)


def test_python_forms_of_head_sets():
    assert ls.AblateHeads([(3, 1), (3, 0)]).heads == {3: (0, 1)}
    assert ls.AblateHeads(["3.1", "4.0"]).heads == {3: (1,), 4: (0,)}
    assert ls.AblateHeads("3.1,3.0").heads == {3: (0, 1)}
    assert ls.ScaleHeads({3: [1, 2]}, gain=0.5).heads == {3: {1: 0.5, 2: 0.5}}


def test_registry_lists_methods():
    assert {"ablate", "scale"} <= set(ls.method_names())
    rows = ls.method_class("ablate").parameters()
    assert ("mode", "zero", rows[1][2]) == rows[1]


def test_head_list_from_a_json_file(tmp_path):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"heads": {"3": [1, 0], "5": [2]}, "scores": []}))
    assert ls.parse_spec(f"act:heads=@{path}").heads == {3: (0, 1), 5: (2,)}
    assert ls.parse_spec(f"ablate:heads=@{path}").heads == {3: (0, 1), 5: (2,)}
    path.write_text(json.dumps({"heads": {}}))
    with pytest.raises(ls.MethodSpecError, match="lists no heads"):
        ls.parse_spec(f"act:heads=@{path}")
