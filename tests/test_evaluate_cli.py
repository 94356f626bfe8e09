"""cpsam evaluate and cpsam_toolkit.evaluate on folders built from ../shared/data labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import load_pair, stems

from cpsam_toolkit import evaluate as E
from cpsam_toolkit import metrics as M
from cpsam_toolkit.cli import main

SETS = {"dsb": "dsb2018_stage1_train_fixed", "consep": "consep_patches256"}


def fake_prediction(m: np.ndarray, seed: int) -> np.ndarray:
    """Ground truth shifted by one pixel, some objects dropped, one false blob, ids permuted."""
    rng = np.random.default_rng(seed)
    p = np.roll(m, 1, axis=1).astype(np.int64)
    labels = np.unique(p)[1:]
    p[np.isin(p, rng.choice(labels, len(labels) // 8, replace=False))] = 0
    p[:6, :6] = np.where(p[:6, :6] == 0, m.max() + 5, p[:6, :6])
    lut = np.zeros(int(p.max()) + 1, np.int64)
    lut[1:] = rng.permutation(np.arange(1, p.max() + 1)) * 2
    return lut[p].astype(np.uint16)


@pytest.fixture()
def folders(tmp_path, data_dir):
    """gt/<set>/<stem>_masks.tif (3 per set) and pred/<set>/ for 2 of them plus one orphan."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    truth: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for short, ds in SETS.items():
        (gt / short).mkdir(parents=True)
        (pred / short).mkdir(parents=True)
        for i, s in enumerate(stems(data_dir, ds)[10:13]):
            _, m = load_pair(data_dir, ds, s)
            tifffile.imwrite(gt / short / f"{s}_masks.tif", m)
            (gt / short / f"{s}_img.tif").write_bytes(b"")  # not a label file: ignored
            if short == "consep":
                src = data_dir / ds / "train" / f"{s}_classes.json"
                (gt / short / f"{s}_classes.json").write_text(src.read_text())
            if i < 2:
                p = fake_prediction(m, i)
                tifffile.imwrite(pred / short / f"{s}_masks.tif", p)
                truth[(short, s)] = (m, p)
                if short == "consep":  # classes of the prediction: those of the overlapped GT
                    cls = json.loads(src.read_text())
                    cp = {}
                    for lb in np.unique(p)[1:]:
                        under = m[p == lb]
                        under = under[under > 0]
                        g = str(np.bincount(under).argmax()) if under.size else None
                        cp[str(lb)] = cls.get(g, "epithelial")
                    (pred / short / f"{s}_classes.json").write_text(json.dumps(cp))
    tifffile.imwrite(pred / "dsb" / "orphan_masks.tif", np.zeros((8, 8), np.uint16))
    return gt, pred, truth


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["evaluate", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _row(table: str, name: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.split()[:1] == [name])


def test_cli_table_json_plot(folders, tmp_path, capsys):
    gt, pred, truth = folders
    js, png = tmp_path / "out" / "eval.json", tmp_path / "out" / "eval.png"
    rc, out, err = _run(capsys, "--pred", pred, "--gt", gt, "--json", js, "--plot", png)
    assert rc == 0, err
    # unpaired files are listed by name
    assert "orphan_masks.tif" in err
    missing = [line for line in err.splitlines() if "missing prediction" in line]
    assert len(missing) == 2 and all("_masks.tif" in line for line in missing)
    # the table: one row per dataset and one for all, numbers = metrics on the same arrays
    th = list(M.IOU_GRID)
    for short in (*SETS, "all"):
        keys = [k for k in truth if short in (k[0], "all")]
        ap, tp, fp, fn = M.average_precision([truth[k][0] for k in keys], [truth[k][1] for k in keys], th)
        er = (fp + fn) / (tp + fn)
        row = _row(out, short)
        assert int(row[1]) == len(keys)
        assert float(row[2]) == pytest.approx(ap[:, 0].mean(), abs=5e-4)  # AP@0.5
        assert float(row[3]) == pytest.approx(ap[:, 5].mean(), abs=5e-4)  # AP@0.75
        assert float(row[4]) == pytest.approx(ap[:, 8].mean(), abs=5e-4)  # AP@0.9
        assert float(row[5]) == pytest.approx(er[:, 0].mean(), abs=5e-4)  # error rate@0.5
        assert 0 < float(row[5]) < 1
    assert "4 image pairs evaluated, 1 unpaired predictions, 2 missing" in out
    # JSON: strict, every image, aggregates and the unpaired files
    d = json.loads(js.read_text())
    assert len(d["images"]) == 4 and d["thresholds"] == pytest.approx(th)
    for img in d["images"]:
        m, p = truth[(img["dataset"], img["stem"])]
        ap, tp, fp, fn = M.average_precision(m, p, th)
        assert img["tp"] == tp.tolist() and img["fp"] == fp.tolist() and img["fn"] == fn.tolist()
        assert img["ap"] == pytest.approx(ap.tolist())
    s = d["summary"]["dsb"]
    assert s["n_images"] == 2
    assert s["pooled"]["tp"][0] == sum(i["tp"][0] for i in d["images"] if i["dataset"] == "dsb")
    assert set(d["summary"]) == {"dsb", "consep", "all"}
    assert [Path(f).name for f in d["unpaired"]["pred_only"]] == ["orphan_masks.tif"]
    assert len(d["unpaired"]["gt_only"]) == 2 and d["errors"] == []
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert sorted(os.listdir(js.parent)) == ["eval.json", "eval.png"]  # no temporary files left


def test_cli_per_class_pooled_and_suffixes(folders, tmp_path, capsys):
    gt, pred, truth = folders
    for f in list(pred.rglob("*_masks.tif")):  # predictions named <stem>_cp_masks.tif
        f.rename(f.with_name(f.name.replace("_masks.tif", "_cp_masks.tif")))
    js = tmp_path / "e.json"
    args = ["--pred", pred / "consep", "--gt", gt / "consep", "--pred-suffix", "_cp_masks.tif"]
    rc, out, err = _run(capsys, *args, "--aggregate", "pooled", "--thresholds", "0.5", "0.75")
    assert rc == 0, err
    assert "pooled over images" in out and "missing prediction" in err
    keys = [k for k in truth if k[0] == "consep"]
    _, tp, fp, fn = (
        x.sum() for x in M.average_precision([truth[k][0] for k in keys], [truth[k][1] for k in keys], 0.5)
    )
    assert float(_row(out, "consep")[2]) == pytest.approx(tp / (tp + fp + fn), abs=5e-4)
    assert _row(out, "consep")[4] == "-"  # AP@0.9 not evaluated

    # per class: <stem>_classes.json next to each label file
    rc, out, err = _run(capsys, *args, "--per-class", "--json", js)
    assert rc == 0, err
    s = json.loads(js.read_text())["summary"]["consep"]
    assert "class_mean_per_image" in s and "epithelial" in s["per_class_pooled"]
    images = json.loads(js.read_text())["images"]
    per_img = [i["class_average"]["error_rate"][0] for i in images]
    assert s["class_mean_per_image"]["error_rate"][0] == pytest.approx(np.mean(per_img))
    # independent check of one image's class average at 0.5
    m, p = truth[("consep", images[0]["stem"])]
    ct = json.loads((gt / "consep" / f"{images[0]['stem']}_classes.json").read_text())
    cp = json.loads((pred / "consep" / f"{images[0]['stem']}_classes.json").read_text())
    errs = []
    for c in sorted(set(ct.values())):
        mt = np.where(np.isin(m, [int(k) for k, v in ct.items() if v == c]), m, 0)
        mp = np.where(np.isin(p, [int(k) for k, v in cp.items() if v == c]), p, 0)
        errs.append(M.matching(mt, mp, 0.5).error_rate[0])
    assert per_img[0] == pytest.approx(np.mean(errs))


def test_cli_errors(folders, tmp_path, capsys):
    gt, pred, _ = folders
    bad = sorted((pred / "dsb").glob("*_masks.tif"))[0]
    bad.write_bytes(b"not a tiff")
    js = tmp_path / "e.json"
    rc, out, err = _run(capsys, "--pred", pred, "--gt", gt, "--json", js)
    assert rc == 1
    assert str(bad) in err and "3 image pairs evaluated" in out
    d = json.loads(js.read_text())
    assert [e["file"] for e in d["errors"]] == [str(bad)] and len(d["images"]) == 3

    # shape mismatch names the prediction
    m = tifffile.imread(next((gt / "consep").glob("*_masks.tif")))
    tifffile.imwrite(bad, np.zeros((m.shape[0] + 1, 7), np.uint16))
    rc, out, err = _run(capsys, "--pred", pred / "dsb", "--gt", gt / "dsb")
    assert rc == 1 and str(bad) in err and "shape" in err

    # per-class without class files on the prediction side
    for f in (pred / "consep").glob("*_classes.json"):
        f.unlink()
    rc, out, err = _run(capsys, "--pred", pred / "consep", "--gt", gt / "consep", "--per-class")
    assert rc == 1 and "_classes.json" in err and "class file not found" in err

    # nothing paired, folder missing
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = _run(capsys, "--pred", empty, "--gt", gt)
    assert rc == 1 and "nothing to evaluate" in err and err.count("missing prediction") == 6
    rc, out, err = _run(capsys, "--pred", tmp_path / "nope", "--gt", gt)
    assert rc == 2 and "nope" in err
    with pytest.raises(SystemExit) as e:  # argparse: usage error
        main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--thresholds", "0", "0.5"])
    assert e.value.code == 2 and "(0, 1]" in capsys.readouterr().err


def test_cli_subprocess(folders, tmp_path):
    gt, pred, _ = folders
    js = tmp_path / "sub.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpsam_toolkit",
            "evaluate",
            "--pred",
            str(pred / "dsb"),
            "--gt",
            str(gt / "dsb"),
            "--no-recursive",
            "--json",
            str(js),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "AP@0.5" in r.stdout and "err@0.5" in r.stdout and "orphan_masks.tif" in r.stderr
    assert len(json.loads(js.read_text())["images"]) == 2


def test_library_functions(folders):
    gt, pred, truth = folders
    pairing, result = E.evaluate_folders(pred, gt, thresholds=[0.5, 0.75, 0.9])
    assert len(pairing.pairs) == 4 and {p.dataset for p in pairing.pairs} == {"dsb", "consep"}
    rows = E.summary_table(result)
    assert [r["dataset"] for r in rows] == ["consep", "dsb", "all"]
    by_ds = E.summarize(result, key=lambda r: r.pair.dataset, include_all=False)
    assert set(by_ds) == {"dsb", "consep"}
    one = E.summarize(result, key=lambda r: "x")
    assert set(one) == {"x"}  # a single group gets no 'all'
    fig = E.plot_summary(result)
    assert len(fig.axes) == 3
    assert "AP@0.5" in E.format_table(rows) and E.format_table([]) == "(no images evaluated)"


def test_consensus_bound(data_dir):
    ds = SETS["dsb"]
    a = [load_pair(data_dir, ds, s)[1] for s in stems(data_dir, ds)[20:24]]
    b = [fake_prediction(m, i) for i, m in enumerate(a)]
    r = E.consensus_bound(a, b)
    ab = [M.matching(x, y, 0.5).error_rate[0] for x, y in zip(a, b, strict=True)]
    ba = [M.matching(y, x, 0.5).error_rate[0] for x, y in zip(a, b, strict=True)]
    expect = np.mean((np.array(ab) + np.array(ba)) / 2)
    assert r["inter_annotator_error_rate"] == pytest.approx(expect) and expect > 0
    assert r["consensus_bound"] == pytest.approx(expect / 2)
    assert E.consensus_bound(b, a)["inter_annotator_error_rate"] == pytest.approx(expect)
    assert E.consensus_bound(a[0], a[0])["consensus_bound"] == 0
    # an empty annotation: only the defined direction counts
    z = np.zeros_like(a[0])
    assert E.consensus_bound([z], [a[0]])["inter_annotator_error_rate"] == 1.0
