"""DIS metrics (mmfast.metrics.dis) against pysodmetrics 1.6.2, image by image and over a dataset,
on random maps, edge cases and a real silhouette; the binary (DiffDIS) protocol; input checks;
the folder command line."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

ps = pytest.importorskip("py_sod_metrics")  # the pysodmetrics package

from mmfast.metrics import dis  # noqa: E402

# Relative tolerance: both sides do the same float64 operations, so they agree to the last bits
# except where a sum runs in another order (the mean over the 256 thresholds: ours ascending,
# pysodmetrics' descending), ~1e-16. The absolute floor only matters for values that are 0 on
# one side and a rounding residue on the other.
RTOL, ATOL = 1e-10, 1e-14
SCALARS = ("maxF", "meanF", "adpF", "wF", "MAE", "Sm", "adpEm", "meanEm", "maxEm", "HCE")


def reference(pairs, normalize):
    """pysodmetrics' numbers for a list of (pred, gt), curves turned to ascending thresholds."""
    fm = ps.FmeasureV2({"f": ps.FmeasureHandler(True, True, beta=0.3),
                        "p": ps.PrecisionHandler(True, False), "r": ps.RecallHandler(True, False)})
    wfm, mae, sm, em, hce = (ps.WeightedFmeasure(), ps.MAE(), ps.Smeasure(), ps.Emeasure(),
                             ps.HumanCorrectionEffortMeasure())
    for pred, gt in pairs:
        for metric in (fm, wfm, mae, sm, em, hce):
            metric.step(pred, gt, normalize=normalize)
    f, e = fm.get_results(), em.get_results()["em"]
    f_curve, em_curve = f["f"]["dynamic"][::-1], e["curve"][::-1]
    return {"maxF": f_curve.max(), "meanF": f_curve.mean(), "adpF": f["f"]["adaptive"],
            "wF": wfm.get_results()["wfm"], "MAE": mae.get_results()["mae"],
            "Sm": sm.get_results()["sm"], "adpEm": e["adp"], "meanEm": em_curve.mean(),
            "maxEm": em_curve.max(), "HCE": hce.get_results()["hce"],
            "F": f_curve, "precision": f["p"]["dynamic"][::-1], "recall": f["r"]["dynamic"][::-1],
            "Em": em_curve}


def assert_close(actual, expected, keys=SCALARS):
    for key in keys:
        np.testing.assert_allclose(actual[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)


def blobs(rng, shape, sigma=3.0):
    """Smooth random field in [0, 1]."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return (field - field.min()) / (field.max() - field.min())


def make_cases():
    """name -> (pred float64 in [0, 1], gt bool), odd sizes."""
    rng = np.random.default_rng(0)
    cases = {}
    for h, w in [(37, 53), (41, 29), (5, 7)]:
        cases[f"noise_{h}x{w}"] = (rng.random((h, w)), rng.random((h, w)) > 0.6)
    for h, w in [(37, 53), (61, 45)]:
        gt = blobs(rng, (h, w)) > 0.55
        pred = np.clip(0.8 * gt + 0.35 * blobs(rng, (h, w), 1.5) + rng.normal(0, 0.1, (h, w)), 0, 1)
        cases[f"blobs_{h}x{w}"] = (pred, gt)
    gt = rng.random((37, 53)) > 0.5
    cases["empty_gt"] = (rng.random((37, 53)), np.zeros((37, 53), bool))
    cases["full_gt"] = (rng.random((37, 53)), np.ones((37, 53), bool))
    for value in (0.0, 0.5, 1.0):
        cases[f"constant_{value}"] = (np.full((37, 53), value), gt)
    cases["constant_pred_empty_gt"] = (np.full((37, 53), 0.25), np.zeros((37, 53), bool))
    cases["perfect"] = (gt.astype(np.float64), gt)
    cases["inverted"] = ((~gt).astype(np.float64), gt)
    return cases


CASES = make_cases()


def as_uint8(pred, gt):
    return (pred * 255).round().astype(np.uint8), gt.astype(np.uint8) * 255


def flavour_inputs(name, flavour):
    """(our inputs, pysodmetrics' inputs, pysodmetrics' normalize flag)."""
    pred, gt = CASES[name]
    if flavour == "float":  # taken as they are
        return (pred, gt), (pred, gt), False
    pred8, gt8 = as_uint8(pred, gt)  # 8-bit images: /255, min-max, gt > 128
    return (pred8, gt8), (pred8, gt8), True


@pytest.mark.parametrize("flavour", ["float", "uint8"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_single_image_functions_match_pysodmetrics(name, flavour):
    (pred, gt), ref_pair, normalize = flavour_inputs(name, flavour)
    expected = reference([ref_pair], normalize)
    f, e = dis.f_measure(pred, gt), dis.e_measure(pred, gt)
    actual = {**{k: f[k] for k in ("maxF", "meanF", "adpF")},
              **{k: e[k] for k in ("adpEm", "meanEm", "maxEm")},
              "wF": dis.weighted_f_measure(pred, gt), "MAE": dis.mae(pred, gt),
              "Sm": dis.s_measure(pred, gt), "HCE": dis.human_correction_effort(pred, gt),
              "F": f["curve"], "precision": f["precision"], "recall": f["recall"], "Em": e["curve"]}
    assert_close(actual, expected, SCALARS + ("F", "precision", "recall", "Em"))
    assert isinstance(actual["HCE"], int) and actual["HCE"] == expected["HCE"]
    # update() returns the image's own scores
    assert_close(dis.DISMetrics().update(pred, gt), expected)


@pytest.mark.parametrize("flavour", ["float", "uint8"])
def test_dataset_accumulation_matches_pysodmetrics(flavour):
    inputs = [flavour_inputs(name, flavour) for name in sorted(CASES)]
    expected = reference([ref for _, ref, _ in inputs], normalize=flavour == "uint8")
    metrics = dis.DISMetrics()
    for ours, _, _ in inputs:
        metrics.update(*ours)
    results = metrics.results()
    assert list(results) == list(dis.METRIC_NAMES)
    assert all(type(v) is float for v in results.values())
    assert_close(results, expected)
    assert_close(metrics.curves(), expected, ("F", "precision", "recall", "Em"))
    # the "Fm bug fix": maxF is the max of the mean curve, below the mean of per-image maxima
    per_image_max = np.mean([dis.f_measure(*ours)["maxF"] for ours, _, _ in inputs])
    assert results["maxF"] <= per_image_max + 1e-15


def test_deprecated_fmeasure_class_agrees():
    """pysodmetrics' older Fmeasure (which the DIS repositories copied) gives the same curves."""
    pairs = [CASES[name] for name in sorted(CASES)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = ps.Fmeasure(beta=0.3)
    for pred, gt in pairs:
        fm.step(pred, gt, normalize=False)
    expected = fm.get_results()
    metrics = dis.DISMetrics(hce=False)
    for pred, gt in pairs:
        metrics.update(pred, gt)
    curves = metrics.curves()
    np.testing.assert_allclose(curves["F"], expected["fm"]["curve"][::-1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(curves["precision"], expected["pr"]["p"][::-1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(curves["recall"], expected["pr"]["r"][::-1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics.results()["adpF"], expected["fm"]["adp"], rtol=RTOL)
    assert "HCE" not in metrics.results()


def horse_pair():
    """skimage's horse silhouette (horse = foreground) and a blurred, noisy prediction with
    flipped patches (false-positive blobs and holes) so that HCE has work to count."""
    from scipy import ndimage
    from skimage import data

    gt = ~data.horse()
    rng = np.random.default_rng(1)
    pred = ndimage.gaussian_filter(gt.astype(np.float64), 2.5)
    pred = np.where(blobs(rng, gt.shape, 4.0) > 0.72, 1 - pred, pred)
    pred = np.clip(pred + rng.normal(0, 0.1, gt.shape), 0, 1)
    return pred, gt


@pytest.mark.parametrize("flavour", ["float", "uint8"])
def test_horse_silhouette_matches_pysodmetrics(flavour):
    pred, gt = horse_pair()
    assert 0.3 < gt.mean() < 0.4  # the horse, not the background
    if flavour == "uint8":
        pred, gt = as_uint8(pred, gt)
    expected = reference([(pred, gt)], normalize=flavour == "uint8")
    metrics = dis.DISMetrics()
    metrics.update(pred, gt)
    results = metrics.results()
    assert_close(results, expected)
    assert results["HCE"] > 50  # the errors are there to be counted
    assert 0.8 < results["Sm"] < 0.95 and 0.8 < results["maxF"] < 1


def test_official_dis_hce_variant_thresholds_the_raw_map_at_128():
    """hce_variant="dis" is xuebinqin/DIS hce_metric_main.py's binarisation (the 8-bit map > 128,
    no min-max): pysodmetrics' HCE of that binary map. On a map that does not span 0..255 the
    default (min-max, then > 0.5) binarises elsewhere and counts otherwise."""
    pred, gt = horse_pair()
    dim = np.round(pred * 200).astype(np.uint8)  # maximum 200
    gt8 = gt.astype(np.uint8) * 255
    oracle = ps.HumanCorrectionEffortMeasure()
    oracle.step(((dim > 128) * 255).astype(np.uint8), gt8, normalize=True)
    expected = oracle.get_results()["hce"]
    assert dis.human_correction_effort(dim, gt8, hce_variant="dis") == expected
    assert dis.human_correction_effort(dim, gt8) != expected
    assert dis.human_correction_effort(dim, gt8, protocol="binary", hce_variant="dis") == expected  # any protocol
    assert dis.human_correction_effort(dim / 255, gt, hce_variant="dis") == expected  # float: 255 p > 128
    # float32 128 / 255 times 255 is 128.0000076: still the 8-bit 128, background as in the official script
    assert dis.human_correction_effort((dim / 255).astype(np.float32), gt, hce_variant="dis") == expected
    assert dis._official_dis_foreground(np.full((2, 2), 128 / 255, dtype=np.float32)).sum() == 0
    assert dis.human_correction_effort(dim > 128, gt, hce_variant="dis") == expected  # bool: as it is
    metrics = dis.DISMetrics(hce_variant="dis")
    metrics.update(dim, gt8)
    assert metrics.results()["HCE"] == expected
    with pytest.raises(ValueError, match=r"hce_variant must be one of \('pysodmetrics', 'dis'\), got 'official'"):
        dis.DISMetrics(hce_variant="official")
    with pytest.raises(ValueError, match="hce_variant must be one of"):
        dis.human_correction_effort(dim, gt8, hce_variant="official")
    with pytest.raises(SystemExit):  # an option that would do nothing
        dis.main(["pred", "gt", "--no-hce", "--hce-variant", "dis"])


def diffdis_binarise(pred):
    """DiffDIS' test_score.py, written out: min-max over the 0..255 values (a constant map is
    divided by 255 instead), then > 0.5 -> 1, the rest 0."""
    res = np.array(pred, np.float64)
    if res.max() == res.min():
        res = res / 255
    else:
        res = (res - res.min()) / (res.max() - res.min())
    res[res > 0.5] = 1
    res[res != 1] = 0
    return res


def binary_protocol_pairs():
    rng = np.random.default_rng(2)
    gt = rng.random((37, 53)) > 0.5
    pairs = [as_uint8(*CASES[name]) for name in ("blobs_37x53", "noise_37x53", "constant_0.5")]
    pairs.append(as_uint8(*horse_pair()))
    # values 1..255: 128 sits exactly at 0.5 after min-max (127 / 254) and must go to 0
    pairs.append((rng.integers(1, 256, (37, 53)).astype(np.uint8), gt.astype(np.uint8) * 255))
    pairs.append((np.full((37, 53), 128, np.uint8), gt.astype(np.uint8) * 255))  # constant > 127.5
    pairs.append((np.full((37, 53), 127, np.uint8), gt.astype(np.uint8) * 255))
    return pairs


def test_binary_protocol_is_soft_protocol_on_binarised_maps():
    pairs = binary_protocol_pairs()
    binary, soft = dis.DISMetrics("binary"), dis.DISMetrics("soft")
    for pred, gt in pairs:
        binarised = diffdis_binarise(pred)
        np.testing.assert_array_equal(dis.prepare(pred, gt, "binary")[0], binarised)
        binary.update(pred, gt)
        soft.update(binarised, gt)
    assert binary.results() == soft.results()
    expected = reference([(diffdis_binarise(p), g > 128) for p, g in pairs], normalize=False)
    assert_close(binary.results(), expected)
    # the threshold sweep collapses: the curves are flat from threshold 1 to 255
    curves = binary.curves()
    assert np.ptp(curves["F"][1:]) == 0 and np.ptp(curves["Em"][1:]) == 0


def test_binary_protocol_on_float_maps():
    pred, gt = CASES["blobs_61x45"]
    scaled = 0.2 + 0.5 * pred  # not spanning [0, 1]: min-max first
    expected_pred = ((scaled - scaled.min()) / (scaled.max() - scaled.min()) > 0.5).astype(float)
    np.testing.assert_array_equal(dis.prepare(scaled, gt, "binary")[0], expected_pred)
    assert dis.s_measure(scaled, gt, "binary") == dis.s_measure(expected_pred, gt)
    assert dis.f_measure(scaled, gt, "binary")["maxF"] != dis.f_measure(scaled, gt)["maxF"]


def test_s_measure_where_pysodmetrics_returns_nan():
    """Foreground centroid on the last row or column: a block of the region term is empty,
    pysodmetrics gets 0 * NaN = NaN; the empty block (weight 0) is left out here."""
    rng = np.random.default_rng(3)
    pred = rng.random((9, 11))
    for gt_rows, gt_cols in [(slice(-1, None), slice(3, 6)), (slice(2, 5), slice(-1, None))]:
        gt = np.zeros((9, 11), bool)
        gt[gt_rows, gt_cols] = True
        sm = ps.Smeasure()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sm.step(pred, gt, normalize=False)
        assert np.isnan(sm.get_results()["sm"])
        # pysodmetrics' own pieces, the empty block dropped
        cy, cx = (np.argwhere(gt).mean(axis=0).round() + 1).astype(int)
        h, w = gt.shape
        blocks = [(slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)),
                  (slice(cy, h), slice(0, cx)), (slice(cy, h), slice(cx, w))]
        region = sum(sm.ssim(pred[b], gt[b]) * pred[b].size / pred.size
                     for b in blocks if pred[b].size)
        expected = max(0, 0.5 * sm.object(pred, gt) + 0.5 * region)
        assert dis.s_measure(pred, gt) == pytest.approx(expected, rel=RTOL)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    pred, gt = CASES["blobs_37x53"]
    expected = dis.DISMetrics().update(pred.astype(np.float32), gt)
    tensors = torch.from_numpy(pred.astype(np.float32)), torch.from_numpy(gt)
    assert dis.DISMetrics().update(*tensors) == expected
    pred8, gt8 = as_uint8(pred, gt)
    assert dis.mae(torch.from_numpy(pred8), torch.from_numpy(gt8)) == dis.mae(pred8, gt8)
    bf16 = torch.from_numpy(pred).to(torch.bfloat16).requires_grad_()
    assert dis.mae(bf16, gt) == dis.mae(bf16.detach().float().numpy(), gt)


GOOD_PRED, GOOD_GT = CASES["noise_37x53"]


@pytest.mark.parametrize("pred, gt, protocol, message", [
    (GOOD_PRED, GOOD_GT[:, :-1], "soft", r"same \(H, W\) shape, got \(37, 53\) and \(37, 52\)"),
    (GOOD_PRED[None], GOOD_GT[None], "soft",
     r"pred must be a 2-D \(H, W\) map, got shape \(1, 37, 53\)"),
    (GOOD_PRED, GOOD_GT.ravel(), "soft", r"gt must be a 2-D \(H, W\) map"),
    (GOOD_PRED[:0], GOOD_GT[:0], "soft", "at least one pixel"),
    (GOOD_PRED * 1.5, GOOD_GT, "soft", r"pred: float values must lie in \[0, 1\]"),
    (GOOD_PRED - 0.1, GOOD_GT, "binary", r"pred: float values must lie in \[0, 1\]"),
    (np.where(GOOD_PRED > 0.5, np.nan, GOOD_PRED), GOOD_GT, "soft", r"must lie in \[0, 1\].*nan"),
    (GOOD_PRED, GOOD_GT * 2.0, "soft", r"gt: float values must lie in \[0, 1\]"),
    ((GOOD_PRED * 255).astype(np.int64), GOOD_GT, "soft",
     r"pred must be uint8 \(0..255\), bool or float16/32/64 in \[0, 1\], got int64"),
    (GOOD_PRED, GOOD_GT.astype(np.int32), "soft", r"gt must be bool, uint8 .* got int32"),
    (GOOD_PRED.tolist(), GOOD_GT, "soft", "pred must be a numpy array or a torch tensor, got list"),
    (GOOD_PRED, GOOD_GT, "hard", r"protocol must be one of \('soft', 'binary'\), got 'hard'"),
    (GOOD_PRED, (GOOD_GT > 0.5).astype(np.uint8), "soft", r"gt is uint8 with values 0 and 1 only.*gt \* 255"),
], ids=["shape", "3d", "1d_gt", "empty", "above_1", "below_0", "nan", "gt_range", "int64",
        "gt_int32", "list", "protocol", "gt_uint8_0_1"])
def test_bad_inputs_raise_value_error(pred, gt, protocol, message):
    with pytest.raises(ValueError, match=message):
        dis.prepare(pred, gt, protocol)
    with pytest.raises(ValueError, match=message):
        dis.DISMetrics(protocol, hce=False).update(pred, gt)


def test_results_before_update_raise():
    metrics = dis.DISMetrics(hce=False)
    with pytest.raises(ValueError, match="no images yet"):
        metrics.results()
    metrics.update(*CASES["perfect"])
    assert len(metrics) == 1 and metrics.results()["MAE"] == 0
    metrics.reset()
    assert len(metrics) == 0


def test_missing_optional_dependencies_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    with pytest.raises(ImportError, match="pip install opencv-python-headless scikit-image"):
        dis.DISMetrics()
    with pytest.raises(ImportError, match="pip install opencv-python-headless scikit-image"):
        dis.human_correction_effort(*CASES["perfect"])
    dis.DISMetrics(hce=False).update(*CASES["perfect"])  # the rest needs no OpenCV
    assert dis.s_measure(*CASES["perfect"]) == pytest.approx(1)
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        dis.weighted_f_measure(*CASES["perfect"])
    assert dis.f_measure(*CASES["perfect"])["maxF"] == 1  # numpy only


# --- folders and command line -----------------------------------------------------------------

@pytest.fixture
def folders(tmp_path):
    """pred/ and gt/ with four images; "b"'s prediction is smaller than its GT, "c"'s is a JPG."""
    from PIL import Image

    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    for stem, name in zip("abcd", ["blobs_37x53", "blobs_61x45", "noise_41x29", "horse"]):
        pred, gt = horse_pair() if name == "horse" else CASES[name]
        pred8, gt8 = as_uint8(pred, gt)
        Image.fromarray(gt8).save(gt_dir / f"{stem}.png")
        image = Image.fromarray(pred8)
        if stem == "b":
            image = image.resize((30, 40), Image.BILINEAR)
        image.save(pred_dir / f"{stem}.{'jpg' if stem == 'c' else 'png'}")
    (pred_dir / "notes.txt").write_text("not an image")
    return pred_dir, gt_dir


def folder_reference(pred_dir, gt_dir, protocol, hce_variant="pysodmetrics"):
    """The accumulator fed the same images, read and resized by hand."""
    from PIL import Image

    metrics = dis.DISMetrics(protocol, hce_variant=hce_variant)
    for stem in "abcd":
        gt = np.asarray(Image.open(gt_dir / f"{stem}.png"))
        image = Image.open(pred_dir / f"{stem}.{'jpg' if stem == 'c' else 'png'}")
        if image.size != (gt.shape[1], gt.shape[0]):  # DiffDIS' test_score.py: PIL's default filter
            image = image.resize((gt.shape[1], gt.shape[0]))
        metrics.update(np.asarray(image), gt)
    return metrics.results()


@pytest.mark.parametrize("protocol, hce_variant", [("soft", "pysodmetrics"), ("binary", "pysodmetrics"),
                                                   ("soft", "dis")])
def test_cli_writes_the_accumulators_results(folders, tmp_path, capsys, protocol, hce_variant):
    pred_dir, gt_dir = folders
    out = tmp_path / "out.json"
    assert dis.main([str(pred_dir), str(gt_dir), "--protocol", protocol, "--json", str(out),
                     "--hce-variant", hce_variant, "--quiet"]) == 0
    written = json.loads(out.read_text())
    assert set(written) == {"pred_dir", "gt_dir", "protocol", "hce_variant", "num_images", "resized", "metrics"}
    assert (written["protocol"], written["hce_variant"], written["num_images"], written["resized"]) == (
        protocol, hce_variant, 4, ["b"])
    assert list(written["metrics"]) == list(dis.METRIC_NAMES)
    assert written["metrics"] == folder_reference(pred_dir, gt_dir, protocol, hce_variant)
    printed = capsys.readouterr().out
    assert "4 images" in printed and "1 resized" in printed and "maxF" in printed


def test_cli_as_a_module(folders, tmp_path):
    """The real entry point, `python -m mmfast.metrics.dis`, in a fresh interpreter."""
    pred_dir, gt_dir = folders
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "-m", "mmfast.metrics.dis", str(pred_dir), str(gt_dir),
                          "--json", str(out), "--no-hce"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "found in sys.modules" not in run.stderr  # runpy's warning about a double import
    assert "HCE" not in run.stdout and "wF" in run.stdout
    expected = folder_reference(pred_dir, gt_dir, "soft")
    expected.pop("HCE")
    assert json.loads(out.read_text())["metrics"] == expected


def test_cli_errors(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    (gt_dir / "e.png").write_bytes((gt_dir / "a.png").read_bytes())
    with pytest.raises(ValueError, match="1 image.* in the ground-truth folder have no prediction "
                                         "with the same name: e"):
        dis.evaluate_folders(pred_dir, gt_dir, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        dis.main([str(pred_dir), str(gt_dir), "--quiet"])
    assert exit_info.value.code == 2
    assert "have no prediction with the same name: e" in capsys.readouterr().err
    (gt_dir / "e.png").unlink()

    (pred_dir / "z.png").write_bytes((pred_dir / "a.png").read_bytes())
    with pytest.raises(ValueError, match="prediction folder have no ground truth .*: z"):
        dis.evaluate_folders(pred_dir, gt_dir, progress=False)
    (pred_dir / "a.jpg").write_bytes((pred_dir / "a.png").read_bytes())
    with pytest.raises(ValueError, match="two images named 'a'"):
        dis.evaluate_folders(pred_dir, gt_dir, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dis.evaluate_folders(tmp_path / "missing", gt_dir, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no .png"):
        dis.evaluate_folders(empty, gt_dir, progress=False)
    with pytest.raises(ValueError, match="protocol must be one of"):
        dis.evaluate_folders(pred_dir, gt_dir, protocol="hard", progress=False)


def test_cli_reads_the_segmentation_examples_output(folders, tmp_path, capsys):
    """Found by a new-user trial: examples/diffdis_segment.py writes <stem>_mask.png next to edge,
    overlay and photo PNGs, which exact-stem matching could not evaluate; and a bad --json path
    failed only after the whole evaluation."""
    pred_dir, gt_dir = folders
    out_dir = tmp_path / "segment_out"
    out_dir.mkdir()
    for path in pred_dir.iterdir():
        if path.suffix in (".png", ".jpg"):
            (out_dir / f"{path.stem}_mask{path.suffix}").write_bytes(path.read_bytes())
            (out_dir / f"{path.stem}_overlay.png").write_bytes((gt_dir / "a.png").read_bytes())
            (out_dir / f"{path.stem}.png").write_bytes((gt_dir / "a.png").read_bytes())  # the input photo
    with_suffix = dis.evaluate_folders(out_dir, gt_dir, hce=False, progress=False, pred_suffix="_mask")
    assert with_suffix == dis.evaluate_folders(pred_dir, gt_dir, hce=False, progress=False)
    with pytest.raises(ValueError, match="no .* images whose name ends with '_nothing'"):
        dis.evaluate_folders(out_dir, gt_dir, progress=False, pred_suffix="_nothing")
    for bad in (str(tmp_path / "missing" / "out.json"), str(tmp_path)):
        with pytest.raises(SystemExit) as exit_info:
            dis.main([str(out_dir), str(gt_dir), "--pred-suffix", "_mask", "--json", bad, "--quiet"])
        assert exit_info.value.code == 2 and "--json" in capsys.readouterr().err
