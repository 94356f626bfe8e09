"""``outputs.repeat_command``: the command line parses back to the same settings, and the Python
call runs and gives the same masks as the original call."""

from __future__ import annotations

import json
import shlex

import numpy as np
import tifffile
from conftest import DSB, stems

from cpsam_toolkit.cli import build_parser
from cpsam_toolkit.commands.segment import _options
from cpsam_toolkit.outputs import repeat_command, run_record
from cpsam_toolkit.segment import InputOptions, MaskOptions, NetOptions


def test_command_line_parses_back_to_the_same_settings():
    settings = [InputOptions(channel_axis=2, channels=(1, 0), percentiles=(2.0, 98.5), invert=True,
                             diameter=17.5),
                NetOptions(batch_size=4, tile_overlap=0.25, augment=True),
                MaskOptions(flow_threshold=0.8, cellprob_threshold=-1.0, min_size=30, niter=300)]
    rep = repeat_command(settings, "cpsam_v2", inputs="plate/*.tif", out="results")
    argv = shlex.split(rep.cli.split("  #")[0])
    assert argv[:2] == ["cpsam", "segment"]
    args = build_parser().parse_args(argv[1:])
    assert (args.inputs, args.out, args.model) == (["plate/*.tif"], "results", "cpsam_v2")
    opts = _options(args)
    assert opts["input_options"] == settings[0]
    assert opts["net_options"] == settings[1]
    assert opts["mask_options"] == settings[2]
    # settings the command line cannot express are named, not dropped silently
    rep = repeat_command({"flow_threshold": 0.4, "tile_norm_blocksize": 64}, None)
    assert "not on the command line: tile_norm_blocksize=64" in rep.cli


def test_python_call_repeats_the_result(data_dir):
    import cpsam_toolkit as cp

    img = tifffile.imread(data_dir / DSB / "train" / f"{stems(data_dir, DSB)[0]}_img.tif")[:128, :128]
    model = cp.load_model("cpsam_toolkit_small", device="cpu")
    kwargs = {"flow_threshold": 0.8, "cellprob_threshold": 0.0, "min_size": 10}
    first = model.segment(img, **kwargs)
    rep = repeat_command(kwargs, model)
    scope = {"image": img}
    exec(rep.python, scope)  # noqa: S102 - our own generated code
    np.testing.assert_array_equal(scope["result"].masks, first.masks)
    rec = json.loads(run_record(kwargs, model))
    assert rec["model"] == "cpsam_toolkit_small" and len(rec["sha256"]) == 64
    assert rec["settings"] == kwargs and rec["cli"].startswith("cpsam segment IMAGES")


def test_settings_object_gives_the_same_command():
    from cpsam_toolkit.settings import Settings

    s = Settings().replace(flow_threshold=0.8, diameter=20.0, channels=(0, 1))
    kwargs = {"flow_threshold": 0.8, "diameter": 20.0, "channels": (0, 1), "cellprob_threshold": 0.0,
              "min_size": 15}
    assert repeat_command(s, "cpsam_v2").cli == repeat_command(kwargs, "cpsam_v2").cli
    args = build_parser().parse_args(shlex.split(repeat_command(s, "cpsam_v2").cli)[1:])
    assert (args.flow_threshold, args.diameter, tuple(args.channels)) == (0.8, 20.0, (0, 1))
