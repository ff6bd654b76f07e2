"""Does the model detect blood it was not trained on? A check with an independent insertion method.

The shipped weights learned from ``training/lesions.py``. This script places hemorrhages with a
different, deliberately simple method - smooth ellipsoids of 55-85 HU at random places inside
the brain (HU 15-45 inside the skull), keeping the scanner noise of the host image - into negative
series and runs the engine on each series with and without the insertion. It prints CT-level
sensitivity on the inserted series and specificity on the untouched ones, per lesion size, under
the weights' decision rule and, from the same slice probabilities, under the paper's consecutive
slice count alone (which differ on thin series when the card asks for a length of blood).

    python benchmarks/foreign_insertion.py --data LAYOUT_DIR [--weights shipped] [--cases 20]

A model that learned our generator's artefacts instead of blood shows a low sensitivity here.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from radnet_node.engine import Engine, EngineSettings, prepare_hu
from radnet_node.postprocess import ct_decision, rule_text
from radnet_node.preprocess import HuSeries, read_hu_slices
from radnet_node.results import SeriesResult

RADII_MM = {
    "small (r 4-7 mm)": (4.0, 7.0),
    "medium (r 8-14 mm)": (8.0, 14.0),
    "large (r 15-25 mm)": (15.0, 25.0),
}


def brain_mask(hu: np.ndarray) -> np.ndarray:
    """Soft tissue of brain density enclosed by bone, per slice, eroded away from the skull."""
    out = np.zeros(hu.shape, dtype=bool)
    for k, plane in enumerate(hu):
        bone = plane > 300
        inside = ndimage.binary_fill_holes(bone) & ~bone
        tissue = inside & (plane > 15) & (plane < 45)
        out[k] = ndimage.binary_erosion(tissue, iterations=6)
    return out


def insert_ellipsoid(
    series: HuSeries, rng: np.random.Generator, radius_range: tuple[float, float]
) -> tuple[np.ndarray, int]:
    """HU with one smooth ellipsoid of blood, and the number of slices it touches."""
    hu = np.array(series.hu, dtype=np.float32)
    mask = brain_mask(hu)
    candidates = np.argwhere(mask)
    if len(candidates) == 0:
        raise ValueError("no brain found")
    centre = candidates[rng.integers(len(candidates))]
    dr, dc = series.pixel_spacing_mm
    positions = np.asarray(series.normal_positions_mm)
    radii = rng.uniform(*radius_range, size=3)
    density = rng.uniform(55.0, 85.0)
    z = (positions - positions[centre[0]])[:, None, None] / radii[0]
    y = ((np.arange(hu.shape[1]) - centre[1]) * dr)[None, :, None] / radii[1]
    x = ((np.arange(hu.shape[2]) - centre[2]) * dc)[None, None, :] / radii[2]
    distance = np.sqrt(z**2 + y**2 + x**2)
    weight = np.clip((1.0 - distance) / 0.15, 0.0, 1.0)  # ~15 % soft edge
    weight *= mask | ndimage.binary_dilation(mask, iterations=6)  # stay inside the skull
    local_mean = ndimage.uniform_filter(hu, size=(1, 9, 9))
    hu = hu + weight * (density - local_mean)  # replace the tissue mean, keep the host's noise
    touched = int((weight.reshape(len(hu), -1).max(axis=1) > 0.5).sum())
    return hu, touched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="layout dataset with negatives")
    parser.add_argument("--weights", default="shipped")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    engine = Engine(EngineSettings(weights=args.weights))

    def row(case_id: str, kind: str, result: SeriesResult, **extra: object) -> dict[str, object]:
        return {
            "case": case_id,
            "kind": kind,
            "spacing_mm": round(result.series.median_slice_spacing_mm, 2),
            "positive": result.ct_positive,
            "positive_slice_count_alone": ct_decision(
                result.slice_probabilities, engine.threshold, engine.min_consecutive
            ),
            **extra,
        }

    with (args.data / "labels.csv").open(newline="") as handle:
        negatives = [r["case_id"] for r in csv.DictReader(handle) if r["ct_label"] == "0"]
    negatives = negatives[: args.cases]
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, object]] = []
    started = time.monotonic()
    for case_id in negatives:
        files = sorted((args.data / "cases" / case_id).rglob("*.dcm"))
        series = read_hu_slices(files, engine.spec, series_label=case_id)
        clean = engine.run([prepare_hu(series, engine.spec)])[0]
        rows.append(row(case_id, "untouched", clean))
        for label, radius_range in RADII_MM.items():
            try:
                hu, touched = insert_ellipsoid(series, rng, radius_range)
            except ValueError as error:
                print(f"{case_id}: skipped ({error})", file=sys.stderr)
                continue
            inserted = dataclasses.replace(series, hu=hu)
            result = engine.run([prepare_hu(inserted, engine.spec)])[0]
            rows.append(row(case_id, label, result, slices=touched))
    rule = rule_text(engine.min_consecutive, engine.min_extent_mm)
    summary: dict[str, object] = {
        "weights": engine.model_info.version,
        "rule": rule,
        "cases": len(negatives),
    }
    print(
        f"| series | n | called positive ({rule}) | {engine.min_consecutive} slices alone |\n"
        "|---|---|---|---|"
    )
    for kind in ["untouched", *RADII_MM]:
        selected = [r for r in rows if r["kind"] == kind]
        if not selected:
            continue
        positive = sum(bool(r["positive"]) for r in selected)
        alone = sum(bool(r["positive_slice_count_alone"]) for r in selected)
        summary[kind] = {"n": len(selected), "positive": positive, "slice_count_alone": alone}
        n = len(selected)
        print(
            f"| {kind} | {n} | {positive} ({100.0 * positive / n:.0f} %) "
            f"| {alone} ({100.0 * alone / n:.0f} %) |"
        )
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
