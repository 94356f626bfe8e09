"""The settings object: validation, provenance, serialisation (cpsam_toolkit.settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpsam_toolkit.settings import SETTING_NAMES, Settings, parse_memory


def test_defaults_match_the_option_dataclasses():
    from cpsam_toolkit.segment import InputOptions, MaskOptions, NetOptions

    s = Settings()
    for opts in (InputOptions(), NetOptions(), MaskOptions()):
        for k, v in vars(opts).items():
            assert getattr(s, k) == v, k
    assert set(s.sources.values()) == {"default"}
    assert s.describe() == ""


def test_sources_and_describe():
    s = Settings.from_model({"flow_threshold": 0.8, "not_a_setting": 1})
    assert s.flow_threshold == 0.8 and s.sources["flow_threshold"] == "model"
    s2 = s.replace(min_size=30, cellprob_threshold=-1.0)
    assert s2.describe().splitlines() == [
        "flow_threshold=0.8 (model)", "cellprob_threshold=-1.0 (user)", "min_size=30 (user)"]
    # a user value overrides a model value, even when equal to the default
    s3 = s.replace(flow_threshold=0.4)
    assert s3.flow_threshold == 0.4 and s3.sources["flow_threshold"] == "user"
    # constructing directly: values that differ from the defaults are "user"
    assert Settings(min_size=5).sources["min_size"] == "user"
    assert Settings(min_size=15).sources["min_size"] == "default"
    assert s == Settings(flow_threshold=0.8)  # sources take no part in equality


def test_round_trip_json():
    s = Settings.from_model({"flow_threshold": 0.8}).replace(
        channels=[1, 0], percentiles=(2, 98), diameter=17.5, gpu_memory="6GB",
        batch_size=np.int64(4), invert=np.bool_(True))
    d = json.loads(json.dumps(s.to_dict()))
    t = Settings.from_dict(d)
    assert t == s and t.sources == s.sources
    assert t.channels == (1, 0) and t.percentiles == (2.0, 98.0)
    assert Settings.from_dict({"flow_threshold": 0.6}).sources["flow_threshold"] == "user"


@pytest.mark.parametrize("bad, field", [
    ({"flow_threshold": -1}, "flow_threshold"),
    ({"percentiles": (99, 1)}, "percentiles"),
    ({"batch_size": 0}, "batch_size"),
    ({"channels": (0, -1)}, "channels"),
    ({"max_size_fraction": 0}, "max_size_fraction"),
    ({"niter": 0}, "niter"),
    ({"gpu_memory": "6"}, "gpu_memory"),
    ({"diameter": -3}, "diameter"),
    ({"cellprob_threshold": float("nan")}, "cellprob_threshold"),
    ({"normalize": "yes"}, "normalize"),
])
def test_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        Settings().replace(**bad)


def test_unknown_names_suggest_the_right_one():
    with pytest.raises(TypeError, match="did you mean 'flow_threshold'"):
        Settings().replace(flow_treshold=0.5)
    with pytest.raises(TypeError, match="unknown setting"):
        Settings.from_dict({"bogus": 1})


def test_parse_memory():
    assert parse_memory("6GB") == 6_000_000_000
    assert parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory(1e9) == 1_000_000_000
    assert Settings(gpu_memory="1.5GiB").gpu_memory_bytes == int(1.5 * 2**30)
    assert Settings().gpu_memory_bytes is None
    with pytest.raises(ValueError, match="unit"):
        parse_memory("6 parsecs")
    assert len(SETTING_NAMES) == 17
