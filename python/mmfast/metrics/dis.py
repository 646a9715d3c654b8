"""Dichotomous image segmentation (DIS) metrics: max / mean / adaptive F-beta, weighted F-beta,
MAE, S-measure, adaptive / mean / max E-measure and HCE, the numbers DiffDIS (ICLR 2025), MVANet
and BiRefNet report on DIS5K. Every definition matches pysodmetrics 1.6.2 (lartpang/PySODMetrics)
to rounding; the tests check it image by image.

Inputs (every function and `DISMetrics.update`): `pred` and `gt` are (H, W) numpy arrays or torch
tensors (any device; detached and copied to the CPU).

* pred: uint8 0..255 (an 8-bit image, as read from a PNG), float16/32/64 in [0, 1], or bool.
* gt: bool, uint8 (foreground = value > 128, as pysodmetrics thresholds it) or a float in [0, 1]
  (foreground = value > 0.5).

Protocols (`protocol=`):

* "soft" (default; PySODMetrics, MVANet and BiRefNet): the map is evaluated as it is. A uint8
  map is an 8-bit image and is treated as pysodmetrics' default `step(pred, gt)` does
  (`normalize=True`): divided by 255, then min-max normalised (MATLAB's `mapminmax`) unless
  constant, so folder evaluations reproduce the published file-based numbers. A float or bool
  map is taken as it is (pysodmetrics' `normalize=False`); quantise it to uint8 (as saving a PNG
  does) to get the min-max step.
* "binary" (DiffDIS' test_score.py): each prediction is min-max normalised (a constant map is
  only divided by 255 when uint8), then binarised, values > 0.5 -> 1 and the rest -> 0, before
  every metric; the metrics are then those of the soft protocol. On uint8 maps the comparison
  is done in integers, exactly as DiffDIS' float64 arithmetic on 0..255 values decides it.

The two protocols are not like-for-like: the binary one throws the confidence away, so the
threshold sweeps collapse (the F and E curves are flat from threshold 1/255 to 1, and max, mean
and adaptive values nearly coincide) and MAE, S-measure and weighted F score a hard mask;
numbers from DiffDIS' paper must only be compared with "binary" numbers, and MVANet / BiRefNet /
PySODMetrics numbers only with "soft" ones. Even under "binary" these are pysodmetrics'
definitions, not a copy of DiffDIS' own utils/saliency_metric.py, which differs in ways that
move its numbers slightly: its GT is divided by its maximum before the > 0.5 test; its max F
sweeps 255 thresholds (values 254 and 255 share a bin) with 1e-8 added to the precision's
denominator; the column it prints as "avgF" is the adaptive F (our "adpF"), and its "adpEm" is
the only E-measure it computes (with 1e-8 for eps); its S-measure uses population standard
deviations and 1e-8 where pysodmetrics uses N - 1 and MATLAB's eps; its weighted F adds 1e-6
instead of eps.

HCE comes in two variants (`hce_variant`). "pysodmetrics" (the default) is pysodmetrics' and
DiffDIS' test_score.py's (HCEMeasure): the map, min-max normalised as above, is binarised at
> 0.5. "dis" is the official DIS evaluation's (xuebinqin/DIS hce_metric_main.py, the numbers of
IS-Net's DIS5K tables): the raw 8-bit map thresholded at > 128 without min-max (a float map:
255 p > 128; a bool map as it is), whatever the protocol. The two agree on maps spanning 0..255
except for pixels of exactly 128, and differ for maps that do not span it (a blurred map whose
maximum is 200: HCE 17 with "pysodmetrics", 11 with "dis", in a trial). The relaxation,
skeleton, boundary filtering and polygon approximation are the official ones in both.

The E-measure is pysodmetrics', its degenerate cases included: a perfect prediction scores an
adaptive / max E slightly above 1 (1.0025 on a 20 x 20 map with a 10 x 10 object), and a ground
truth of a pixel or two can make it huge (a 1 x 1 map: mean E 3.5e15), which then dominates a
dataset mean. Leave such images out of an evaluation rather than average them in.

Sources: F-measure, Achanta et al., CVPR 2009; weighted F-measure, Margolin et al., CVPR 2014;
MAE, Perazzi et al., CVPR 2012; S-measure, Fan et al., ICCV 2017; E-measure, Fan et al.,
IJCAI 2018; HCE, Qin et al., "Highly Accurate Dichotomous Image Segmentation", ECCV 2022.

Dependencies: numpy for everything except the weighted F-measure (SciPy's exact Euclidean
distance transform) and HCE (OpenCV contours and polygon approximation, scikit-image
skeletonisation), which import them when called; `pip install mmfast[metrics]` installs them.

Command line: `python -m mmfast.metrics.dis PRED_DIR GT_DIR [--protocol soft|binary]
[--pred-suffix SUFFIX] [--json OUT] [--no-hce] [--hce-variant pysodmetrics|dis]` evaluates a folder of predictions against a folder of ground truths
(see `evaluate_folders`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = [
    "PROTOCOLS", "HCE_VARIANTS", "METRIC_NAMES", "prepare", "f_measure", "weighted_f_measure", "mae", "s_measure",
    "e_measure", "human_correction_effort", "DISMetrics", "evaluate_folders", "format_table",
    "main",
]

PROTOCOLS = ("soft", "binary")
HCE_VARIANTS = ("pysodmetrics", "dis")
METRIC_NAMES = ("maxF", "meanF", "adpF", "wF", "MAE", "Sm", "adpEm", "meanEm", "maxEm", "HCE")

BETA2 = 0.3            # beta^2 of the F-measure
SM_ALPHA = 0.5         # S-measure: weight of the object term
HCE_RELAX = 5          # HCE: erosion / dilation iterations that forgive thin boundary errors
HCE_EPSILON = 2.0      # HCE: Ramer-Douglas-Peucker tolerance, in pixels
_EPS = np.spacing(1)   # MATLAB's eps, as the reference toolboxes add it
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=np.uint8)  # disk(1)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

_HCE_INSTALL = "pip install opencv-python-headless scikit-image"


# --- inputs --------------------------------------------------------------------------------

def _as_numpy(x, name: str) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _check_unit_range(a: np.ndarray, name: str) -> None:
    lo, hi = a.min(), a.max()
    if not (lo >= 0 and hi <= 1):  # also catches NaN
        raise ValueError(f"{name}: float values must lie in [0, 1], got min {lo} and max {hi}")


def _checked(pred, gt) -> tuple:
    pred, gt = _as_numpy(pred, "pred"), _as_numpy(gt, "gt")
    for name, a in (("pred", pred), ("gt", gt)):
        if a.ndim != 2:
            raise ValueError(f"{name} must be a 2-D (H, W) map, got shape {tuple(a.shape)}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same (H, W) shape, got {tuple(pred.shape)} "
                         f"and {tuple(gt.shape)}")
    if pred.size == 0:
        raise ValueError(f"pred and gt must have at least one pixel, got shape {tuple(pred.shape)}")

    if pred.dtype.kind == "f":
        _check_unit_range(pred, "pred")
    elif pred.dtype not in (np.uint8, np.bool_):
        raise ValueError(f"pred must be uint8 (0..255), bool or float16/32/64 in [0, 1], "
                         f"got {pred.dtype}")

    if gt.dtype == np.bool_:
        pass
    elif gt.dtype == np.uint8:
        if gt.max() == 1:  # a 0/1 mask saved as uint8: read as 0..255 it has no foreground at all
            raise ValueError("gt is uint8 with values 0 and 1 only: uint8 ground truth is read as 0..255 "
                             "(foreground > 128, as pysodmetrics reads it), which would make this mask all "
                             "background; pass gt.astype(bool) or gt * 255")
        gt = gt > 128
    elif gt.dtype.kind == "f":
        _check_unit_range(gt, "gt")
        gt = gt > 0.5
    else:
        raise ValueError(f"gt must be bool, uint8 (foreground > 128) or float in [0, 1] "
                         f"(foreground > 0.5), got {gt.dtype}")
    return pred, gt


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _check_hce_variant(variant: str) -> None:
    if variant not in HCE_VARIANTS:
        raise ValueError(f"hce_variant must be one of {HCE_VARIANTS}, got {variant!r}")


def prepare(pred, gt, protocol: str = "soft") -> tuple:
    """Validates a (pred, gt) pair and turns it into what every metric reads.

    "soft": a uint8 pred is divided by 255 and min-max normalised unless constant (pysodmetrics'
    normalize=True), a float or bool one is cast to float64 as it is. "binary": min-max
    normalised (a constant uint8 map only divided by 255), then > 0.5 -> 1.0, else 0.0.

    Args:
        pred: (H, W) uint8 0..255, float16/32/64 in [0, 1] or bool; numpy array or torch tensor.
        gt: (H, W) bool, uint8 (foreground > 128) or float in [0, 1] (foreground > 0.5).
        protocol: "soft" or "binary" (see the module docstring).

    Returns:
        (pred, gt): float64 (H, W) in [0, 1] (exactly 0 or 1 under "binary") and bool (H, W).

    Raises:
        ValueError: not an array / tensor, not 2-D, shapes differ, no pixels, an unsupported
            dtype, float values outside [0, 1] (or NaN), or an unknown protocol.
    """
    _check_protocol(protocol)
    return _prepare_checked(*_checked(pred, gt), protocol)


def _prepare_checked(pred: np.ndarray, gt: np.ndarray, protocol: str) -> tuple:
    if protocol == "soft":
        if pred.dtype == np.uint8:  # pysodmetrics' normalize=True: im2double, then mapminmax
            p = pred / 255
            lo, hi = p.min(), p.max()
            return ((p - lo) / (hi - lo) if hi != lo else p), gt
        return pred.astype(np.float64), gt
    if pred.dtype == np.uint8:  # (q - lo) / (hi - lo) > 0.5, decided in integers
        q = pred.astype(np.int32)
        lo, hi = int(q.min()), int(q.max())
        fg = 2 * (q - lo) > hi - lo if hi != lo else q > 127  # constant: q / 255 > 0.5
    else:
        p = pred.astype(np.float64)
        lo, hi = p.min(), p.max()
        fg = ((p - lo) / (hi - lo) if hi != lo else p) > 0.5
    return fg.astype(np.float64), gt


def _official_dis_foreground(pred: np.ndarray) -> np.ndarray:
    """The official DIS HCE's binarisation of a checked pred (hce_metric_main.py: the 8-bit map
    > 128, no min-max), as a float64 0/1 map _hce reads."""
    if pred.dtype == np.uint8:
        fg = pred > 128
    elif pred.dtype == np.bool_:
        fg = pred
    else:  # the 8-bit value saving the map would write: a float32 128 / 255 times 255 exceeds 128
        fg = np.rint(pred.astype(np.float64) * 255) > 128
    return fg.astype(np.float64)


def _prepared_with_hce_map(pred, gt, protocol: str, variant: str) -> tuple:
    """(prepared pred, gt, the map HCE binarises at > 0.5): the prepared map, or the official DIS
    binarisation of the raw one."""
    raw, g = _checked(pred, gt)
    p, g = _prepare_checked(raw, g, protocol)
    return p, g, _official_dis_foreground(raw) if variant == "dis" else p


# --- per-image kernels on prepared inputs (pred float64 in [0, 1], gt bool) -----------------

def _threshold_counts(p: np.ndarray, g: np.ndarray) -> tuple:
    """tp[k], fp[k]: foreground / background pixels with floor(255 p) >= k, k = 0..255."""
    q = (p * 255).astype(np.uint8).ravel()
    hist = np.bincount(q.astype(np.intp) + 256 * g.ravel(), minlength=512)
    tp = np.cumsum(hist[:255:-1])[::-1]  # hist[256:] reversed, cumulated, turned back
    fp = np.cumsum(hist[255::-1])[::-1]
    return tp, fp


def _div0(num, den) -> np.ndarray:
    """num / den, 0 where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _f_curves(tp, fp, n_fg: int) -> tuple:
    precision = _div0(tp, tp + fp)
    recall = _div0(tp, n_fg)
    num = (1 + BETA2) * precision * recall
    f = np.divide(num, BETA2 * precision + recall, out=np.zeros_like(num), where=num != 0)
    return f, precision, recall


def _adaptive_binary(p: np.ndarray) -> np.ndarray:
    return p >= min(2 * p.mean(), 1)


def _adaptive_f(p: np.ndarray, g: np.ndarray) -> float:
    b = _adaptive_binary(p)
    tp = np.count_nonzero(b & g)
    if tp == 0:
        return 0.0
    precision, recall = tp / np.count_nonzero(b), tp / np.count_nonzero(g)
    return float((1 + BETA2) * precision * recall / (BETA2 * precision + recall))


def _em_from_counts(tp, fp, n_fg: int, n: int):
    """E-measure of binarised maps from their confusion counts (scalars or arrays)."""
    pred_fg = tp + fp
    if n_fg == 0:
        total = n - pred_fg
    elif n_fg == n:
        total = pred_fg
    else:
        fn = n_fg - tp
        tn = n - pred_fg - fn
        mu_p, mu_g = pred_fg / n, n_fg / n
        total = 0
        # (demeaned pred value, demeaned gt value, pixel count) of the four confusion cells
        for a, b, count in ((1 - mu_p, 1 - mu_g, tp), (1 - mu_p, -mu_g, fp),
                            (-mu_p, 1 - mu_g, fn), (-mu_p, -mu_g, tn)):
            align = 2 * (a * b) / (a ** 2 + b ** 2 + _EPS)
            total = total + (align + 1) ** 2 / 4 * count
    return total / (n - 1 + _EPS)


def _adaptive_em(p: np.ndarray, g: np.ndarray, n_fg: int) -> float:
    b = _adaptive_binary(p)
    return float(_em_from_counts(np.count_nonzero(b & g), np.count_nonzero(b & ~g), n_fg, g.size))


def _s_object(x: np.ndarray) -> float:
    mean = x.mean()
    std = x.std(ddof=1) if x.size > 1 else 0.0
    return 2 * mean / (mean ** 2 + 1 + std + _EPS)


def _ssim(p: np.ndarray, g: np.ndarray) -> float:
    n = p.size
    x, y = p.mean(), g.mean()
    dx, dy = p - x, g - y
    sigma_x = np.sum(dx ** 2) / (n - 1 + _EPS)
    sigma_y = np.sum(dy ** 2) / (n - 1 + _EPS)
    sigma_xy = np.sum(dx * dy) / (n - 1 + _EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x ** 2 + y ** 2) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + _EPS)
    return 1.0 if beta == 0 else 0.0


def _s_measure(p: np.ndarray, g: np.ndarray) -> float:
    y = g.mean()
    if y == 0:
        return float(1 - p.mean())
    if y == 1:
        return float(p.mean())
    obj = _s_object(p[g]) * y + _s_object(1 - p[~g]) * (1 - y)

    # Region term: split at the foreground centroid (rounded half to even, then + 1 as in the
    # MATLAB code) into four blocks, SSIM of each weighted by its area.
    h, w = g.shape
    n_fg = np.count_nonzero(g)
    cy = int(np.round(np.dot(np.arange(h), g.sum(axis=1)) / n_fg)) + 1
    cx = int(np.round(np.dot(np.arange(w), g.sum(axis=0)) / n_fg)) + 1
    area = h * w
    w_lt = cx * cy / area
    w_rt = cy * (w - cx) / area
    w_lb = (h - cy) * cx / area
    weights = (w_lt, w_rt, w_lb, 1 - w_lt - w_rt - w_lb)
    blocks = ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)),
              (slice(cy, h), slice(0, cx)), (slice(cy, h), slice(cx, w)))
    gf = g.astype(np.float64)
    region = 0.0
    for weight, block in zip(weights, blocks):
        if p[block].size:  # an empty block has weight 0 (pysodmetrics returns NaN here)
            region += _ssim(p[block], gf[block]) * weight
    return float(max(0.0, SM_ALPHA * obj + (1 - SM_ALPHA) * region))


def _gaussian_7x7_sigma5() -> np.ndarray:
    """MATLAB's fspecial('gaussian', 7, 5)."""
    y, x = np.ogrid[-3.0:4.0, -3.0:4.0]
    k = np.exp(-(x * x + y * y) / (2 * 5 * 5))
    k[k < np.finfo(k.dtype).eps * k.max()] = 0
    return k / k.sum()


def _import_scipy_ndimage():
    try:
        from scipy import ndimage
    except ImportError as e:
        raise ImportError("the weighted F-measure needs SciPy: pip install scipy "
                          "(or pip install mmfast[metrics])") from e
    return ndimage


def _weighted_f(p: np.ndarray, g: np.ndarray) -> float:
    if not g.any():
        return 0.0
    ndimage = _import_scipy_ndimage()
    bg = ~g
    # Distance to, and index of, the nearest foreground pixel.
    dist, (iy, ix) = ndimage.distance_transform_edt(bg, return_indices=True)
    err = np.abs(p - g)
    # Pixel dependency: a background pixel takes the error of its nearest foreground pixel,
    # then the errors are smoothed; a foreground pixel keeps the smaller of the two.
    err_t = err.copy()
    err_t[bg] = err[iy[bg], ix[bg]]
    err_a = ndimage.convolve(err_t, _gaussian_7x7_sigma5(), mode="constant", cval=0)
    err_min = np.where(g & (err_a < err), err_a, err)
    # Pixel importance: background errors weigh up to 2x with the distance to the object.
    importance = np.where(bg, 2 - np.exp(np.log(0.5) / 5 * dist), 1.0)
    err_w = err_min * importance
    tp_w = np.count_nonzero(g) - np.sum(err_w[g])
    fp_w = np.sum(err_w[bg])
    recall = 1 - np.mean(err_w[g])
    precision = tp_w / (tp_w + fp_w + _EPS)
    return float(2 * recall * precision / (recall + precision + _EPS))  # beta = 1


def _import_hce_deps():
    try:
        import cv2
        from skimage.morphology import skeletonize
    except ImportError as e:
        raise ImportError(f"HCE needs OpenCV and scikit-image: {_HCE_INSTALL} (or pass hce=False "
                          "/ --no-hce to skip it)") from e
    return cv2, skeletonize


def _correction_points(cv2, mask: np.ndarray, condition: np.ndarray, epsilon: float) -> int:
    """Polygon control points plus independent regions a human needs to fix `mask`.

    The boundary of `mask` is kept where it touches `condition` (dilated by one pixel), each
    pixel once, in contour order; every kept run is approximated by an open RDP polyline whose
    vertices are counted, and every connected region of `mask` with no kept boundary pixel
    counts one (it is removed or filled whole).
    """
    mask8 = mask.astype(np.uint8)
    contours, _ = cv2.findContours(mask8, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    n_regions, labels = cv2.connectedComponents(mask8, connectivity=8)
    n_regions -= 1  # label 0 is the background
    if not contours:
        return n_regions
    touch = cv2.dilate(condition.astype(np.uint8), _CROSS).ravel() != 0
    points = np.concatenate([c.reshape(-1, 2) for c in contours])  # (x, y)
    flat = points[:, 1].astype(np.intp) * mask.shape[1] + points[:, 0]
    first = np.zeros(len(flat), dtype=bool)
    first[np.unique(flat, return_index=True)[1]] = True
    kept = touch[flat] & first  # a pixel is kept at its first visit only
    n_touched = np.unique(labels.ravel()[flat[kept]]).size

    n_points = 0
    end = 0
    for contour in contours:
        start, end = end, end + len(contour)
        k = kept[start:end]
        if not k.any():
            continue
        edges = np.flatnonzero(np.diff(np.concatenate(([0], k.view(np.int8), [0]))))
        runs = [points[start + a:start + b] for a, b in zip(edges[::2], edges[1::2])]
        if len(runs) > 1:  # the last run continues into the first one: join them
            if np.abs(runs[0][0] - runs[-1][-1]).max() == 1:
                runs[-1] = np.concatenate([runs[-1], runs[0][::-1]])
                del runs[0]
        for run in runs:
            poly = cv2.approxPolyDP(run.reshape(-1, 1, 2).astype(np.int32), epsilon, False)
            n_points += len(poly)
    return n_points + n_regions - n_touched


def _hce(p: np.ndarray, g: np.ndarray, relax: int = HCE_RELAX, epsilon: float = HCE_EPSILON) -> int:
    cv2, skeletonize = _import_hce_deps()
    skeleton = skeletonize(g).astype(bool)
    b = p > 0.5
    tp, fp, fn = b & g, b & ~g, g & ~b
    eroded_union = cv2.erode((b | g).astype(np.uint8), _CROSS, iterations=relax).astype(bool)

    # False positives thinner than `relax` along the object are forgiven; the rest grow back
    # over the background only.
    fp_kept = fp & eroded_union
    for _ in range(relax):
        fp_kept = cv2.dilate(fp_kept.astype(np.uint8), _CROSS).astype(bool) & ~g
    fp_kept &= fp
    # The same for false negatives, growing back over the predicted background; missed
    # skeleton pixels (thin structures) always count.
    fn_kept = fn & eroded_union
    for _ in range(relax):
        fn_kept = cv2.dilate(fn_kept.astype(np.uint8), _CROSS).astype(bool) & ~b
    fn_kept = (fn_kept & fn) | (skeleton & ~tp)

    return (_correction_points(cv2, fp_kept, tp | fn_kept, epsilon)
            + _correction_points(cv2, fn_kept, ~(tp | fp_kept | fn_kept), epsilon))


def _image_scores(p: np.ndarray, g: np.ndarray, hce_map: Optional[np.ndarray]) -> dict:
    """Everything DISMetrics records for one prepared image (HCE of hce_map if given)."""
    tp, fp = _threshold_counts(p, g)
    n_fg = int(np.count_nonzero(g))
    f, precision, recall = _f_curves(tp, fp, n_fg)
    scores = {
        "F": f, "precision": precision, "recall": recall,
        "Em": _em_from_counts(tp, fp, n_fg, g.size),
        "adpF": _adaptive_f(p, g),
        "adpEm": _adaptive_em(p, g, n_fg),
        "wF": _weighted_f(p, g),
        "MAE": float(np.mean(np.abs(p - g))),
        "Sm": _s_measure(p, g),
    }
    if hce_map is not None:
        scores["HCE"] = _hce(hce_map, g)
    return scores


# --- public per-image functions -------------------------------------------------------------

_INPUTS_DOC = """pred: (H, W) uint8 0..255, float16/32/64 in [0, 1] or bool; numpy array or
            torch tensor.
        gt: (H, W) bool, uint8 (foreground > 128) or float in [0, 1] (foreground > 0.5).
        protocol: "soft" (default) or "binary", see the module docstring."""
_RAISES_DOC = """ValueError: inputs that `prepare` rejects (not 2-D, shapes differ, unsupported
            dtype, float values outside [0, 1]) or an unknown protocol."""


def f_measure(pred, gt, protocol: str = "soft") -> dict:
    """F-beta (beta^2 = 0.3) of one image over 256 thresholds, and at the adaptive one.

    The prepared map p (see `prepare`) is quantised as floor(255 p) and binarised at k = 0..255
    (foreground where the quantised value >= k); the adaptive threshold is min(2 mean(p), 1) on
    the unquantised map. Precision, recall and F are 0 where their denominator is 0.

    Args:
        {inputs}

    Returns:
        dict: "maxF", "meanF" (max / mean of this image's curve), "adpF" (floats) and the
        float64 (256,) curves "curve" (F), "precision" and "recall", index k = threshold k.

    Raises:
        {raises}

    Source: Achanta et al., CVPR 2009; matches pysodmetrics 1.6.2 FmeasureV2 with
    FmeasureHandler (and the deprecated Fmeasure), whose curves run from k = 255 down to 0.
    """
    p, g = prepare(pred, gt, protocol)
    tp, fp = _threshold_counts(p, g)
    f, precision, recall = _f_curves(tp, fp, int(np.count_nonzero(g)))
    return {"maxF": float(f.max()), "meanF": float(f.mean()), "adpF": _adaptive_f(p, g),
            "curve": f, "precision": precision, "recall": recall}


def weighted_f_measure(pred, gt, protocol: str = "soft") -> float:
    """Weighted F-beta (beta = 1) of one image; 0 when gt has no foreground.

    Errors of background pixels are taken from their nearest foreground pixel, smoothed by a 7x7
    Gaussian (sigma 5) and weighted by up to 2x with the distance to the object. Needs SciPy.

    Args:
        {inputs}

    Returns:
        float in [0, 1], higher is better.

    Raises:
        {raises}
        ImportError: SciPy is not installed.

    Source: Margolin et al., "How to Evaluate Foreground Maps?", CVPR 2014; matches pysodmetrics
    1.6.2 WeightedFmeasure.
    """
    return _weighted_f(*prepare(pred, gt, protocol))


def mae(pred, gt, protocol: str = "soft") -> float:
    """Mean absolute error between the map and the binary ground truth.

    Args:
        {inputs}

    Returns:
        float in [0, 1], lower is better.

    Raises:
        {raises}

    Source: Perazzi et al., CVPR 2012; matches pysodmetrics 1.6.2 MAE.
    """
    p, g = prepare(pred, gt, protocol)
    return float(np.mean(np.abs(p - g)))


def s_measure(pred, gt, protocol: str = "soft") -> float:
    """Structure measure, alpha = 0.5: object-aware plus region-aware (4-block SSIM) similarity.

    An all-background gt gives 1 - mean(pred), an all-foreground one mean(pred). One
    deliberate difference: when the foreground centroid falls on the last row or column, a
    block is empty and pysodmetrics returns NaN (0 * NaN); here the empty block, whose weight
    is 0, adds nothing.

    Args:
        {inputs}

    Returns:
        float in [0, 1], higher is better.

    Raises:
        {raises}

    Source: Fan et al., "Structure-measure", ICCV 2017; matches pysodmetrics 1.6.2 Smeasure.
    """
    return _s_measure(*prepare(pred, gt, protocol))


def e_measure(pred, gt, protocol: str = "soft") -> dict:
    """Enhanced-alignment measure at 256 thresholds (as in `f_measure`) and the adaptive one.

    Args:
        {inputs}

    Returns:
        dict: "adpEm", "meanEm", "maxEm" (floats) and "curve", float64 (256,), index k =
        threshold k.

    Raises:
        {raises}

    Source: Fan et al., "Enhanced-alignment Measure for Binary Foreground Map Evaluation",
    IJCAI 2018; matches pysodmetrics 1.6.2 Emeasure (whose curve runs from k = 255 down to 0).
    """
    p, g = prepare(pred, gt, protocol)
    tp, fp = _threshold_counts(p, g)
    n_fg = int(np.count_nonzero(g))
    curve = _em_from_counts(tp, fp, n_fg, g.size)
    return {"adpEm": _adaptive_em(p, g, n_fg), "meanEm": float(curve.mean()),
            "maxEm": float(curve.max()), "curve": curve}


def human_correction_effort(pred, gt, protocol: str = "soft", hce_variant: str = "pysodmetrics") -> int:
    """Human correction effort (relax = 5, epsilon = 2.0) of the binarised map.

    The number of mouse clicks a human would need to fix the mask: polygon control points
    (Ramer-Douglas-Peucker, epsilon 2 px) along the false-positive and false-negative
    boundaries that touch the object, plus one per error region that can be removed or
    filled whole. Errors thinner than 5 px along the object are forgiven, missed skeleton
    pixels are not. Needs OpenCV and scikit-image (`pip install opencv-python-headless
    scikit-image`).

    Args:
        {inputs}
        hce_variant: "pysodmetrics" (default: the prepared map > 0.5, pysodmetrics' and
            DiffDIS') or "dis" (the official DIS script's: the raw 8-bit map > 128); see the
            module docstring.

    Returns:
        int >= 0, lower is better.

    Raises:
        {raises}
        ValueError: an unknown hce_variant.
        ImportError: OpenCV or scikit-image is not installed.

    Source: Qin et al., "Highly Accurate Dichotomous Image Segmentation", ECCV 2022; matches
    pysodmetrics 1.6.2 HumanCorrectionEffortMeasure ("pysodmetrics") and xuebinqin/DIS
    hce_metric_main.py ("dis").
    """
    _check_protocol(protocol)
    _check_hce_variant(hce_variant)
    _, g, hce_map = _prepared_with_hce_map(pred, gt, protocol, hce_variant)
    return _hce(hce_map, g)


for _f in (f_measure, weighted_f_measure, mae, s_measure, e_measure, human_correction_effort):
    if _f.__doc__:  # None under python -OO
        _f.__doc__ = _f.__doc__.format(inputs=_INPUTS_DOC, raises=_RAISES_DOC)
del _f


# --- accumulator ------------------------------------------------------------------------------

class DISMetrics:
    """Accumulates the DIS metrics over a dataset, image by image.

    Scalars are averaged over images; maxF / meanF / meanEm / maxEm are the max / mean over
    the 256 thresholds of the image-averaged F and E curves (the "Fm bug fix": not the mean of
    per-image maxima), as pysodmetrics computes them.

    Args:
        protocol: "soft" (default) or "binary", see the module docstring.
        hce: also compute HCE (needs OpenCV and scikit-image; the slowest metric).
        hce_variant: "pysodmetrics" (default) or "dis" (the official DIS script's
            binarisation, for IS-Net's tables), see the module docstring.

    Raises:
        ValueError: unknown protocol or hce_variant.
        ImportError: SciPy (weighted F), or with hce=True OpenCV / scikit-image, is missing;
            the message says what to pip install.

    Example::

        metrics = DISMetrics()
        for pred, gt in pairs:           # (H, W) maps, see `prepare`
            metrics.update(pred, gt)
        metrics.results()                # {"maxF": ..., ..., "HCE": ...}

    Source: matches pysodmetrics 1.6.2 FmeasureV2 (FmeasureHandler, beta^2 = 0.3),
    WeightedFmeasure, MAE, Smeasure, Emeasure and HumanCorrectionEffortMeasure fed the same
    images (see the per-metric functions for the papers).
    """

    def __init__(self, protocol: str = "soft", hce: bool = True, hce_variant: str = "pysodmetrics"):
        _check_protocol(protocol)
        _check_hce_variant(hce_variant)
        _import_scipy_ndimage()
        if hce:
            _import_hce_deps()
        self.protocol = protocol
        self.hce = hce
        self.hce_variant = hce_variant
        self.reset()

    def reset(self) -> None:
        """Forgets every image seen so far."""
        self._scores: list = []

    def __len__(self) -> int:
        return len(self._scores)

    def update(self, pred, gt) -> dict:
        """Adds one image; returns its own scores (same keys as `results`).

        Args:
            pred, gt: one (H, W) pair as `prepare` takes it.

        Raises:
            ValueError: what `prepare` rejects.
        """
        p, g, hce_map = _prepared_with_hce_map(pred, gt, self.protocol, self.hce_variant)
        scores = _image_scores(p, g, hce_map if self.hce else None)
        self._scores.append(scores)
        return _summary([scores], self.hce)

    def results(self) -> dict:
        """The dataset's metrics: {name: float} for the names in METRIC_NAMES (HCE only if
        hce=True). Raises ValueError before the first update."""
        if not self._scores:
            raise ValueError("DISMetrics.results(): no images yet, call update() first")
        return _summary(self._scores, self.hce)

    def curves(self) -> dict:
        """Image-averaged float64 (256,) curves "F", "precision", "recall" and "Em", index k =
        threshold k / 255 (for PR and F-threshold plots). Raises ValueError before any update."""
        if not self._scores:
            raise ValueError("DISMetrics.curves(): no images yet, call update() first")
        return {k: np.mean(np.array([s[k] for s in self._scores]), axis=0)
                for k in ("F", "precision", "recall", "Em")}


def _summary(scores: list, hce: bool) -> dict:
    def mean(key):
        return np.mean(np.array([s[key] for s in scores], dtype=np.float64), axis=0)

    f, em = mean("F"), mean("Em")
    out = {"maxF": float(f.max()), "meanF": float(f.mean()), "adpF": float(mean("adpF")),
           "wF": float(mean("wF")), "MAE": float(mean("MAE")), "Sm": float(mean("Sm")),
           "adpEm": float(mean("adpEm")), "meanEm": float(em.mean()), "maxEm": float(em.max())}
    if hce:
        out["HCE"] = float(mean("HCE"))
    return out


# --- folders and command line -----------------------------------------------------------------

def _images_by_stem(folder: Path, what: str, stem_suffix: str = "") -> dict:
    """{name: path} of the folder's images; with stem_suffix only those whose stem ends with it,
    named without it (examples/diffdis_segment.py writes <stem>_mask.png next to other files)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist or is not a folder")
    found: dict = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES and path.stem.endswith(stem_suffix):
            name = path.stem[:len(path.stem) - len(stem_suffix)]
            if name in found:
                raise ValueError(f"{what} folder {str(folder)!r} has two images named "
                                 f"{name!r}: {found[name].name} and {path.name}")
            found[name] = path
    if not found:
        which = f" whose name ends with {stem_suffix!r}" if stem_suffix else ""
        raise ValueError(f"{what} folder {str(folder)!r} has no {'/'.join(_IMAGE_SUFFIXES)} images{which}")
    return found


def _load_gray(path: Path, size=None) -> tuple:
    """(8-bit gray (H, W) uint8 array, whether it was resized); colour / palette images are
    converted like PIL's convert("L"), `size` = (W, H) resizes with PIL's bicubic filter (DiffDIS's)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading images needs Pillow: pip install Pillow "
                          "(or pip install mmfast[metrics])") from e
    try:
        im = Image.open(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from e
    with im:
        if im.mode not in ("L", "1", "P", "RGB", "RGBA", "LA"):
            raise ValueError(f"{path}: expected an 8-bit gray image, got PIL mode {im.mode!r}")
        im = im.convert("L") if im.mode != "L" else im
        resize = size is not None and im.size != tuple(size)
        if resize:
            im = im.resize(size, getattr(Image, "Resampling", Image).BICUBIC)  # PIL's default: DiffDIS's call
        return np.asarray(im, dtype=np.uint8).copy(), resize


def _unmatched_message(names: list, present: str, absent: str) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{len(names)} image(s) in the {present} folder have no {absent} with the same "
            f"name: {shown}")


def evaluate_folders(pred_dir, gt_dir, protocol: str = "soft", hce: bool = True,
                     progress: bool = True, pred_suffix: str = "", hce_variant: str = "pysodmetrics") -> dict:
    """Evaluates every prediction in `pred_dir` against the ground truth of the same file
    stem in `gt_dir` (.png / .jpg / .jpeg / .bmp, 8-bit gray; colour images are converted to
    gray as PIL's convert("L") does). Every file must have its partner: a prediction without
    a ground truth or a ground truth without a prediction is an error, not skipped. With
    `pred_suffix` (e.g. "_mask", what examples/diffdis_segment.py writes) the predictions are
    the files named <stem><pred_suffix>.<ext>, matched to <stem>.<ext>; other files in
    `pred_dir` are ignored.

    A prediction whose size differs from its ground truth's is resized to the ground truth's
    size with PIL's bicubic filter, as DiffDIS' test_score.py does (`sal.resize((w, h))` on a
    mode-L image: PIL's default filter since Pillow 7); BiRefNet resizes with cv2.resize
    (bilinear, no antialiasing) and pysodmetrics / SOCToolbox not at all, so scores of resized
    maps depend on the tool (maxF 0.9730 bicubic vs 0.9714 bilinear on a 1024^2 map resized to
    1300 x 900 in a trial). Their names are listed under "resized"; saving predictions at the
    ground truth's size avoids the question.

    Args:
        pred_dir, gt_dir: folders (str or Path).
        protocol: "soft" or "binary" (see the module docstring).
        hce: also compute HCE (slow on DIS5K-sized images).
        progress: show a tqdm progress bar on stderr.
        hce_variant: "pysodmetrics" or "dis" (see the module docstring).

    Returns:
        dict: "protocol", "hce_variant" (with hce=True), "num_images", "resized" (list of
        stems) and "metrics" (the DISMetrics.results() dict).

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: no images, duplicate stems, unmatched files, unreadable images, an unknown
            protocol or hce_variant.
        ImportError: Pillow, SciPy, or (hce=True) OpenCV / scikit-image is missing.
    """
    from tqdm import tqdm

    metrics = DISMetrics(protocol, hce=hce, hce_variant=hce_variant)
    preds = _images_by_stem(Path(pred_dir), "prediction", pred_suffix)
    gts = _images_by_stem(Path(gt_dir), "ground-truth")
    no_gt = sorted(set(preds) - set(gts))
    no_pred = sorted(set(gts) - set(preds))
    if no_pred:
        raise ValueError(_unmatched_message(no_pred, "ground-truth", "prediction"))
    if no_gt:
        raise ValueError(_unmatched_message(no_gt, "prediction", "ground truth"))

    resized = []
    for stem in tqdm(sorted(gts), desc="DIS metrics", unit="img", disable=not progress):
        gt, _ = _load_gray(gts[stem])
        pred, was_resized = _load_gray(preds[stem], size=(gt.shape[1], gt.shape[0]))
        if was_resized:
            resized.append(stem)
        metrics.update(pred, gt)
    return {"protocol": protocol, **({"hce_variant": hce_variant} if hce else {}), "num_images": len(metrics),
            "resized": resized, "metrics": metrics.results()}


def format_table(metrics: dict) -> str:
    """Two-line text table of a results() dict (HCE with one decimal, the rest with four)."""
    names = [n for n in METRIC_NAMES if n in metrics]
    head = " ".join(f"{n:>7}" for n in names)
    row = " ".join(f"{metrics[n]:7.1f}" if n == "HCE" else f"{metrics[n]:7.4f}" for n in names)
    return f"{head}\n{row}"


def main(argv=None) -> int:
    """`python -m mmfast.metrics.dis PRED_DIR GT_DIR [--protocol soft|binary] [--pred-suffix SUFFIX]
    [--json OUT] [--no-hce] [--hce-variant pysodmetrics|dis] [--quiet]`: prints the table (and writes the JSON of `evaluate_folders`).
    Returns 0; bad arguments, folders or images exit with status 2 and a one-line message."""
    parser = argparse.ArgumentParser(
        prog="python -m mmfast.metrics.dis",
        description="DIS metrics (maxF, meanF, adpF, wF, MAE, Sm, E-measures, HCE) of a folder of "
                    "predictions against a folder of ground truths, matched by file name.")
    parser.add_argument("pred_dir", help="folder of predicted maps (8-bit gray PNG/JPG)")
    parser.add_argument("gt_dir", help="folder of ground-truth masks (8-bit gray PNG/JPG)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="soft",
                        help="soft: maps as they are (PySODMetrics, MVANet, BiRefNet); binary: "
                             "min-max normalise and binarise at 0.5 first (DiffDIS). Default soft.")
    parser.add_argument("--pred-suffix", default="", metavar="SUFFIX",
                        help="predictions are PRED_DIR/<stem>SUFFIX.png for GT_DIR/<stem>.png, other files "
                             "ignored (examples/diffdis_segment.py's output: --pred-suffix _mask)")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument("--no-hce", action="store_true", help="skip HCE (the slowest metric)")
    parser.add_argument("--hce-variant", choices=HCE_VARIANTS, default=None,
                        help="pysodmetrics: the min-max normalised map > 0.5 (pysodmetrics, DiffDIS); dis: the "
                             "raw 8-bit map > 128 (the official DIS script, IS-Net's tables). Default pysodmetrics.")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.no_hce and args.hce_variant is not None:
        parser.error("--hce-variant picks how HCE binarises; with --no-hce there is no HCE")
    args.hce_variant = args.hce_variant or "pysodmetrics"
    if args.json:  # before the evaluation (HCE over DIS5K takes a while), not after it
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"--json {args.json!r}: needs a file name in an existing, writable folder")
    try:
        out = evaluate_folders(args.pred_dir, args.gt_dir, protocol=args.protocol,
                               hce=not args.no_hce, progress=not args.quiet, pred_suffix=args.pred_suffix,
                               hce_variant=args.hce_variant)
    except (ValueError, FileNotFoundError, ImportError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    note = f", {len(out['resized'])} resized to the GT size (PIL bicubic, as DiffDIS)" if out["resized"] else ""
    hce_note = ", HCE binarised as the official DIS script (> 128)" if out.get("hce_variant") == "dis" else ""
    print(f"{out['num_images']} images, {out['protocol']} protocol{hce_note}{note}")
    print(format_table(out["metrics"]))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"pred_dir": str(args.pred_dir), "gt_dir": str(args.gt_dir), **out}, f,
                          indent=2)
                f.write("\n")
        except OSError as e:
            parser.exit(2, f"{parser.prog}: error: cannot write {args.json}: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
