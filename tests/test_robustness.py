"""Robustness report (cpsam_toolkit.robustness, cpsam evaluate --robustness) on real crops.

The end-to-end report runs the shipped model on two 96 x 96 crops of the shipped model's
validation images (one grayscale, one colour DSB image); without the shipped file it uses a
random tiny model and skips the checks on the direction of the scores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from conftest import load_pair, requires_trained_shipped_model

from cpsam_toolkit import evaluate as E
from cpsam_toolkit import robustness as R
from cpsam_toolkit.cli import main
from cpsam_toolkit.commands.evaluate import ROBUSTNESS_FAMILIES
from cpsam_toolkit.training import augment as A

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "cpsam_toolkit" / "models" / "cpsam_small.pt"
SPLIT = ROOT / "cpsam_toolkit" / "models" / "shipped_split.json"
DSB = "dsb2018_stage1_train_fixed"
#: validation images (shipped_split.json): a grayscale one and a colour one, 15-17 nuclei per crop
PREFIXES = ("5b2ccfb94d", "4d14a3629b")
CROP = 96


def val_stems(prefixes=PREFIXES) -> list[str]:
    val = json.loads(SPLIT.read_text())["val"]["dsb2018"]
    return [next(s for s in val if s.startswith(p)) for p in prefixes]


def crop(a: np.ndarray, n: int = CROP) -> np.ndarray:
    y0, x0 = (a.shape[0] - n) // 2, (a.shape[1] - n) // 2
    return a[y0 : y0 + n, x0 : x0 + n]


@pytest.fixture(scope="module")
def crops(data_dir):
    stems = val_stems()
    pairs = [load_pair(data_dir, DSB, s) for s in stems]
    return [crop(i) for i, _ in pairs], [crop(m) for _, m in pairs], [s[:10] for s in stems]


def annotation_b(m: np.ndarray, seed: int = 0) -> np.ndarray:
    """A second 'annotator': two objects missed and one 5x5 object added on background."""
    rng = np.random.default_rng(seed)
    b = m.astype(np.int32).copy()
    labels = np.unique(b)[1:]
    b[np.isin(b, rng.choice(labels, 2, replace=False))] = 0
    free = np.argwhere(np.lib.stride_tricks.sliding_window_view(m, (5, 5)).max(axis=(-1, -2)) == 0)
    y, x = free[len(free) // 2]
    b[y : y + 5, x : x + 5] = b.max() + 1
    return b


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> tuple[Path, bool]:
    """(model file, is the shipped model)."""
    if SHIPPED.is_file():
        return SHIPPED, True
    import torch

    from cpsam_toolkit.network import CPSAMNet, get_config
    from cpsam_toolkit.network.checkpoints import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(CPSAMNet(get_config("tiny")), path)
    return path, False


@pytest.fixture(scope="module")
def model(model_path):
    from cpsam_toolkit.segment import load_model

    return load_model(model_path[0])


@pytest.fixture(scope="module")
def report(model, crops):
    images, masks, names = crops
    b = [annotation_b(masks[0]), None]
    return R.robustness_report(model, images, masks, seed=0, names=names, annotations_b=b)


# ------------------------------------------------------------------------------- perturbations


def test_cli_families_match_library():
    assert ROBUSTNESS_FAMILIES == R.FAMILIES


def test_prepare_gray_pad_and_replicate(crops):
    images, _, _ = crops
    x, gray = R.prepare_image(images[0])
    assert gray and x.shape == (3, CROP, CROP) and x.dtype == np.float32
    assert np.all(x[1:] == 0) and np.ptp(x[0]) > 0
    lo, hi = np.percentile(x[0], [1, 99])
    assert abs(lo) < 1e-6 and abs(hi - 1) < 1e-5  # renormalised 1-99 %
    xr, _ = R.prepare_image(images[0], gray="replicate")
    assert np.array_equal(xr[0], xr[1]) and np.array_equal(xr[0], xr[2])
    xc, gray_c = R.prepare_image(images[1])
    assert not gray_c and all(np.ptp(c) > 0 for c in xc)


def test_channel_orders_and_random_permutation(crops):
    images, masks, _ = crops
    x, _ = R.prepare_image(images[1])
    m = masks[1]
    rgb, g, _ = R.perturb(x, m, "channels", "RGB")
    assert np.array_equal(rgb, x) and g is m
    brg, _, _ = R.perturb(x, m, "channels", "BRG")
    assert np.array_equal(brg, x[[2, 0, 1]])
    gbr, _, _ = R.perturb(x, m, "channels", "GBR")
    assert np.array_equal(gbr, x[[1, 2, 0]])
    perms = {R.random_permutation(0, i) for i in range(40)}
    assert len(perms) > 3 and all(sorted(p) == [0, 1, 2] for p in perms)  # one per image
    rnd, _, info = R.perturb(x, m, "channels", "random", seed=0, image_index=7)
    assert np.array_equal(rnd, x[list(R.random_permutation(0, 7))])
    assert info["permutation"] == list(R.random_permutation(0, 7))


@pytest.mark.parametrize("target", R.LEVELS["size"])
def test_size_family_reaches_the_diameter(crops, target):
    images, masks, _ = crops
    x, _ = R.prepare_image(images[0])
    m = masks[0]
    d = R.median_diameter(m)
    y, g, info = R.perturb(x, m, "size", target)
    assert y.shape[1:] == g.shape and y.dtype == np.float32
    assert g.dtype == m.dtype and set(np.unique(g)) <= set(np.unique(m))  # nearest: no new labels
    assert g.shape[0] == round(CROP * target / d)
    assert R.median_diameter(g) == pytest.approx(target, rel=0.15)
    assert info["scale"] == pytest.approx(target / d)


def test_degradations_are_the_training_ones(crops):
    """poisson/blur at the original size and downsample/anisotropic at 30 px are exactly
    augment.degrade with the paper's level (one implementation), with seeded generators."""
    images, masks, _ = crops
    x, _ = R.prepare_image(images[1])
    m = masks[1]
    for fam in ("poisson", "blur"):
        for k, lvl in enumerate(R.LEVELS[fam]):
            y, g, _ = R.perturb(x, m, fam, lvl, seed=3, image_index=1)
            rng = np.random.default_rng([3, 1, R._FAMILY_INDEX[fam], k])
            want, _ = A.degrade(x, rng, kind=fam, level=lvl)
            assert np.array_equal(y, want) and g is m
    x30, m30, _ = R.perturb(x, m, "clean", "30px")
    assert R.median_diameter(m30) == pytest.approx(30, rel=0.15)
    for fam in ("downsample", "anisotropic"):
        for k, lvl in enumerate(R.LEVELS[fam]):
            y, g, info = R.perturb(x, m, fam, lvl, seed=3, image_index=1)
            axis = R.anisotropic_axis(3, 1) if fam == "anisotropic" else None
            rng = np.random.default_rng([3, 1, R._FAMILY_INDEX[fam], k])
            want, _ = A.degrade(x30, rng, kind=fam, level=lvl, axis=axis)
            assert np.array_equal(y, want) and np.array_equal(g, m30)
            assert info.get("axis") == axis


def test_degradation_levels_have_the_documented_effect(crops):
    images, masks, _ = crops
    x, _ = R.prepare_image(images[1])
    m = masks[1]
    # heavier Poisson noise: larger deviation from the clean image
    dev = [np.abs(R.perturb(x, m, "poisson", k)[0] - x).mean() for k in R.LEVELS["poisson"]]
    assert dev[0] < dev[1] < dev[2]
    # blur (+ light shot noise): the image looks like the blurred clean image, not the clean one
    for sigma in R.LEVELS["blur"]:
        y = R.perturb(x, m, "blur", sigma)[0][0]
        blurred = np.asarray(A.gaussian_blur(x[0], sigma))
        assert np.corrcoef(y.ravel(), blurred.ravel())[0, 1] > np.corrcoef(y.ravel(), x[0].ravel())[0, 1]
    # larger pixels: pixel-to-pixel differences shrink with the factor
    x30, m30, _ = R.perturb(x, m, "clean", "30px")
    rough = [np.abs(np.diff(R.perturb(x, m, "downsample", f)[0], axis=-1)).mean() for f in (2, 5, 10)]
    assert rough[2] < rough[1] < rough[0] < np.abs(np.diff(x30, axis=-1)).mean()
    # anisotropic: only the chosen axis loses detail
    y, _, info = R.perturb(x, m, "anisotropic", 12, seed=0, image_index=0)
    ax = info["axis"]
    along = np.abs(np.diff(y, axis=1 + ax)).mean() / np.abs(np.diff(x30, axis=1 + ax)).mean()
    across = np.abs(np.diff(y, axis=2 - ax)).mean() / np.abs(np.diff(x30, axis=2 - ax)).mean()
    assert along < 0.7 * across
    # every degraded image is renormalised to its 1st/99th percentiles
    for fam in ("poisson", "blur", "downsample", "anisotropic"):
        y = R.perturb(x, m, fam, R.LEVELS[fam][0])[0]
        lo, hi = np.percentile(y[0], [1, 99])
        assert abs(lo) < 1e-5 and abs(hi - 1) < 1e-4


def test_bad_inputs(crops):
    images, masks, _ = crops
    x, _ = R.prepare_image(images[0])
    with pytest.raises(ValueError, match="unknown family"):
        R.perturb(x, masks[0], "jpeg", 1)
    with pytest.raises(ValueError, match="channel order"):
        R.perturb(x, masks[0], "channels", "RBB")
    with pytest.raises(ValueError, match="no objects"):
        R.perturb(x, np.zeros_like(masks[0]), "size", 30)
    fake = SimpleNamespace(segment=None, name="x", info={})
    with pytest.raises(ValueError, match="unknown robustness families"):
        R.robustness_report(fake, images, masks, families=["noise"])
    with pytest.raises(ValueError, match="diameter"):
        R.robustness_report(fake, images, masks, segment_kwargs={"diameter": 30})


# ------------------------------------------------------------------------------- the report


def _conditions(families=R.FAMILIES):
    return R._conditions(families)


def test_every_family_and_level_is_present(report, crops):
    _, _, names = crops
    conds = _conditions()
    assert len(conds) == 1 + 1 + sum(len(v) for v in R.LEVELS.values())
    got = {(r["family"], r["level"]) for r in report.means}
    assert got == {(f, R.level_label(lv)) for f, lv in conds}
    assert len(report.rows) == len(conds) * len(names)
    for f, lv in conds:
        rows = [r for r in report.rows if (r["family"], r["level"]) == (f, R.level_label(lv))]
        assert sorted(r["image"] for r in rows) == sorted(names)
        for r in rows:
            assert 0 <= r["ap50"] <= 1 and r["error_rate"] >= 0 and r["n_true"] > 0
        mean = report.mean(f, lv)
        assert mean == pytest.approx(np.mean([r["ap50"] for r in rows]))
    # scored at the resized scale
    size90 = [r for r in report.rows if r["family"] == "size" and r["level"] == "90"]
    assert all(r["shape"][0] > 3 * CROP for r in size90)
    table = R.report_table(report)
    assert [(t["family"], t["level"]) for t in table] == [(r["family"], r["level"]) for r in report.means]
    clean = report.mean("clean", "original")
    assert next(t for t in table if t["family"] == "poisson" and t["level"] == "0.5")["d_ap50"] == (
        pytest.approx(report.mean("poisson", 0.5) - clean)
    )
    text = R.format_report(report)
    assert "anisotropic" in text and "consensus bound" in text


@requires_trained_shipped_model
def test_scores_move_the_expected_way(report, model_path):
    if not model_path[1]:
        pytest.skip("shipped model absent: a random tiny model has no expected direction")
    tol = 0.1  # two small crops and a small, briefly trained model: only gross inversions fail
    clean = report.mean("clean", "original")
    assert report.mean("poisson", 0.5) <= clean + tol
    assert report.mean("poisson", 0.5) <= report.mean("poisson", 5) + tol
    assert report.mean("blur", 8) <= clean + tol
    assert report.mean("size", 10) <= report.mean("size", 30) + tol
    assert report.mean("downsample", 10) <= report.mean("clean", "30px") + tol
    er = "error_rate"
    assert report.mean("poisson", 0.5, er) >= report.mean("clean", "original", er) - tol


def test_identical_inputs_are_segmented_once_and_agree(report):
    for name in {r["image"] for r in report.rows}:
        row = {(r["family"], r["level"]): r for r in report.rows if r["image"] == name}
        for a, b in ((("channels", "RGB"), ("clean", "original")), (("size", "30"), ("clean", "30px"))):
            assert {k: row[a][k] for k in ("ap50", "error_rate", "n_pred", "tp")} == {
                k: row[b][k] for k in ("ap50", "error_rate", "n_pred", "tp")
            }


def test_same_seed_same_table_and_subsets_agree(report, model, crops):
    images, masks, names = crops
    again = R.robustness_report(model, images, masks, families=["poisson"], seed=0, names=names)
    sub = [r for r in report.rows if r["family"] in ("clean", "poisson") and r["level"] != "30px"]
    assert again.rows == sub
    assert again.means == [r for r in report.means if (r["family"], r["level"]) in
                           {(a["family"], a["level"]) for a in again.means}]
    # another seed draws other noise (inputs differ; a weak model may still score the same)
    x, _ = R.prepare_image(images[0])
    a = R.perturb(x, masks[0], "poisson", 2.5, seed=0)[0]
    b = R.perturb(x, masks[0], "poisson", 2.5, seed=1)[0]
    assert not np.array_equal(a, b)
    assert np.array_equal(a, R.perturb(x, masks[0], "poisson", 2.5, seed=0)[0])


def test_files_json_csv_png(report, tmp_path):
    js = R.write_json(report, tmp_path / "out" / "rob.json")
    cs = R.write_csv(report, tmp_path / "out" / "rob.csv")
    png = R.save_figure(R.plot_report(report), tmp_path / "out" / "rob.png")
    d = json.loads(js.read_text())
    assert d["means"] == report.means and d["rows"] == report.rows
    assert d["settings"]["seed"] == 0 and d["model"]["name"]
    assert d["consensus"]["n_images"] == 1
    assert R.from_json(js).means == report.means
    with cs.open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == R.CSV_COLUMNS
    per_image = [r for r in rows if r["image"] != "mean"]
    means = [r for r in rows if r["image"] == "mean"]
    assert len(per_image) == len(report.rows) and len(means) == len(report.means)
    for r, m in zip(means, report.means, strict=True):
        assert (r["family"], r["level"]) == (m["family"], m["level"])
        assert float(r["ap50"]) == pytest.approx(m["ap50"], abs=1e-5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the figure also accepts the JSON form (for the notebook evaluator)
    fig = R.plot_report(d)
    assert len(fig.axes) == 2 * len(R.FAMILIES)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rob.csv", "rob.json", "rob.png"]


def test_writes_are_atomic(report, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for n in ("r.json", "r.csv", "r.png"):
        (out / n).write_text("old")
    fig = R.plot_report(report)

    def fail(path, *a, **k):  # write part of the file, then fail
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(Path, "write_text", fail)
        with pytest.raises(OSError, match="disk full"):
            R.write_json(report, out / "r.json")
        with pytest.raises(OSError, match="disk full"):
            R.write_csv(report, out / "r.csv")
    monkeypatch.setattr(fig, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        R.save_figure(fig, out / "r.png")
    assert sorted(p.name for p in out.iterdir()) == ["r.csv", "r.json", "r.png"]  # no temp files left
    assert all((out / n).read_text() == "old" for n in ("r.csv", "r.json", "r.png"))


# ------------------------------------------------------------------------------- consensus


def test_consensus_from_perturbed_ground_truth(crops):
    _, masks, _ = crops
    a = [masks[0], masks[1]]
    b = [annotation_b(m, i) for i, m in enumerate(a)]
    ref = E.consensus_bound(a, b)
    for m, e_ab, e_ba in zip(a, ref["error_rate_b_vs_a"], ref["error_rate_a_vs_b"], strict=True):
        n = len(np.unique(m)) - 1
        # A as reference: 2 missed + 1 added -> (FN + FP) / n; B as reference: 1 FN, 2 FP
        assert e_ab == pytest.approx(3 / n)
        assert e_ba == pytest.approx(3 / (n - 2 + 1))
    inter = np.mean([(3 / (len(np.unique(m)) - 1) + 3 / (len(np.unique(m)) - 2)) / 2 for m in a])
    perfect = R.consensus_summary(a, b, a)
    assert perfect["inter_annotator_error_rate"] == pytest.approx(inter)
    assert perfect["consensus_bound"] == pytest.approx(inter / 2)
    assert perfect["model_error_rate"] == 0 and perfect["position"] == "at or below the consensus bound"
    like_b = R.consensus_summary(a, b, b)  # a model that agrees with annotator B
    assert like_b["model_error_rate"] == pytest.approx(np.mean(ref["error_rate_b_vs_a"]))
    assert like_b["position"] == "between the consensus bound and the inter-annotator error rate"
    assert 0 < like_b["fraction_of_gap"] < 1
    worse = R.consensus_summary(a, b, [np.zeros_like(m) for m in a])
    assert worse["model_error_rate"] == 1 and worse["position"] == "above the inter-annotator error rate"


def test_consensus_in_the_report(report, crops):
    _, masks, names = crops
    c = report.consensus
    ref = E.consensus_bound([masks[0]], [annotation_b(masks[0])])
    assert c["images"] == [names[0]] and c["n_images"] == 1
    assert c["inter_annotator_error_rate"] == pytest.approx(ref["inter_annotator_error_rate"])
    assert c["consensus_bound"] == pytest.approx(ref["inter_annotator_error_rate"] / 2)
    clean = next(r for r in report.rows if r["image"] == names[0] and r["family"] == "clean"
                 and r["level"] == "original")
    assert c["model_error_rate"] == pytest.approx(clean["error_rate"])
    assert c["position"] in ("at or below the consensus bound",
                             "between the consensus bound and the inter-annotator error rate",
                             "above the inter-annotator error rate")


# ------------------------------------------------------------------------------- command line


def test_cli_robustness(tmp_path, data_dir, model_path, capsys):
    """A folder with a validation image, a training image and an image without ground truth;
    --split keeps the validation image; a second annotation folder; one family for speed."""
    imgs, bdir = tmp_path / "imgs", tmp_path / "b"
    imgs.mkdir()
    bdir.mkdir()
    val = val_stems(PREFIXES[:1])[0]
    train = json.loads(SPLIT.read_text())["train"]["dsb2018"][0]
    for s in (val, train):
        im, m = load_pair(data_dir, DSB, s)
        tifffile.imwrite(imgs / f"{s}_img.tif", im)
        tifffile.imwrite(imgs / f"{s}_masks.tif", m)
        tifffile.imwrite(bdir / f"{s}_masks.tif", annotation_b(m))
    tifffile.imwrite(imgs / "orphan_img.tif", np.zeros((32, 32), np.uint8))
    out = tmp_path / "out"
    argv = ["evaluate", "--robustness", "--model", str(model_path[0]), "--images", str(imgs),
            "--split", str(SPLIT), "--crop", "64", "--families", "channels", "--annotations-b", str(bdir),
            "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), "--plot", str(out / "r.png"),
            "--no-progress"]
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    d = json.loads((out / "r.json").read_text())
    assert [i["name"] for i in d["images"]] == [val]
    assert d["images"][0]["shape"] == [64, 64]
    assert {(m["family"], m["level"]) for m in d["means"]} == {
        ("clean", "original"), *(("channels", lv) for lv in R.LEVELS["channels"])}
    assert d["consensus"]["n_images"] == 1 and "human consensus" in cap.out
    assert "channels" in cap.out and "wrote" in cap.out
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "r.csv").read_text().splitlines()) == 1 + 5 + 5


def test_cli_robustness_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--robustness", "--images", str(tmp_path)])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--robustness", "--model", "x", "--images", str(tmp_path), "--families", "jpeg"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--gt", str(tmp_path)])
    assert e.value.code == 2 and "--pred" in capsys.readouterr().err
    rc = main(["evaluate", "--robustness", "--model", "x", "--images", str(tmp_path / "nope")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["evaluate", "--robustness", "--model", "x", "--images", str(tmp_path)])
    assert rc == 1 and "no image" in capsys.readouterr().err
