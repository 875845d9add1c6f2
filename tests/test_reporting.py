"""Result files are strict JSON: a non-finite number is written as null."""

import json

import numpy as np
import pytest

from aoi_jax import integrity, reporting


def strict_load(text):
    """json.loads that rejects the NaN / Infinity tokens, as strict parsers (JavaScript, jq, Go) do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null(tmp_path):
    obj = {"a": [1.0, float("nan"), np.float32(np.inf)], "b": {"c": -np.inf, "d": (np.float64(0.5), 2)},
           "e": "NaN", "f": True, "g": None}
    want = {"a": [1.0, None, None], "b": {"c": None, "d": [0.5, 2]}, "e": "NaN", "f": True, "g": None}
    assert strict_load(integrity.to_json(obj)) == want
    reporting.write_json(tmp_path / "report.json", obj)
    assert strict_load((tmp_path / "report.json").read_text()) == want
    with pytest.raises(ValueError, match="non-standard JSON token NaN"):
        strict_load(json.dumps({"x": float("nan")}))                   # what json.dumps writes by default
