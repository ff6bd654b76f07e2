"""Acute intracranial hemorrhages (five subtypes) and normal hyperdense mimics on the head atlas.

Each lesion is a blood-fraction field on a crop of the atlas grid with its own density, optional
oedema, sulcal effacement and mass effect; ``render_lesions`` writes them into a case's HU volume.
Mimics (calcifications, a calcified meningioma) are rendered the same way but are not blood.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import numpy as np
from scipy import ndimage as ndi

from training.anatomy import HeadAtlas, TissueHU

SUBTYPES = ("intraparenchymal", "subdural", "epidural", "subarachnoid", "intraventricular")
SUBTYPE_WEIGHTS = (0.28, 0.24, 0.14, 0.20, 0.14)


@dataclass(frozen=True)
class MassEffect:
    """A radial push away from ``centre_mni``: the brain near it is displaced outwards."""

    centre_mni: tuple[float, float, float]
    amplitude_mm: float
    radius_mm: float


@dataclass(frozen=True, eq=False)
class LesionField:
    """One lesion (or mimic) on a crop of the atlas grid.

    Attributes
    ----------
    subtype : str
        One of ``SUBTYPES`` for blood; ``calcification`` / ``meningioma`` for mimics.
    lo : tuple[int, int, int]
        Atlas index of the crop's first voxel.
    fraction : np.ndarray
        float32 crop: the fraction of each voxel the lesion fills (its partial volume).
    hu : np.ndarray
        float32 crop: the lesion's own density where it is present.
    oedema : np.ndarray | None
        float32 crop weight (0-1) of perilesional oedema.
    effacement : np.ndarray | None
        float32 crop weight (0-1) by which sulcal CSF next to the lesion is effaced.
    mass_effect : MassEffect | None
        Displacement of the surrounding brain, applied when the case is sampled.
    centre_mni : tuple[float, float, float]
        Nominal centre (MNI mm).
    is_blood : bool
        False for mimics.
    """

    subtype: str
    lo: tuple[int, int, int]
    fraction: np.ndarray
    hu: np.ndarray
    oedema: np.ndarray | None = None
    oedema_hu: float = 20.0
    effacement: np.ndarray | None = None
    mass_effect: MassEffect | None = None
    centre_mni: tuple[float, float, float] = (0.0, 0.0, 0.0)
    is_blood: bool = True

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(lo, lo + n) for lo, n in zip(self.lo, self.fraction.shape, strict=True))  # type: ignore[return-value]

    @property
    def volume_ml(self) -> float:
        return float(self.fraction.sum(dtype=np.float64) / 1000.0)

    @property
    def mean_hu(self) -> float:
        weight = self.fraction.astype(np.float64)
        total = weight.sum()
        return float((weight * self.hu).sum() / total) if total > 0 else float("nan")


# ---------------------------------------------------------------- candidate sites (per atlas)


@dataclass(frozen=True, eq=False)
class _Sites:
    parenchyma: np.ndarray  # (n, 3) atlas indices: deep parenchyma
    convexity: np.ndarray  # (n, 3) atlas indices on the supratentorial inner table
    surface_normal: np.ndarray  # (n, 3) inward unit normals at ``convexity``


@functools.lru_cache(maxsize=2)
def _sites(atlas: HeadAtlas) -> _Sites:
    tissue = atlas.grey.astype(np.int16) + atlas.white.astype(np.int16)
    x, y, z = (atlas.axis_mm(a) for a in range(3))
    parenchyma = (tissue > 215) & (atlas.inner_depth_mm > 9.0) & (atlas.ventricles < 20)
    par = np.argwhere(parenchyma[::2, ::2, ::2]) * 2
    depth = atlas.inner_depth_mm
    shell = (depth >= 0.0) & (depth < 1.0)
    shell &= (z[None, None, :] > -12.0) & (np.abs(x)[:, None, None] > 18.0)
    shell &= (y[None, :, None] > -85.0) & (y[None, :, None] < 55.0)
    conv = np.argwhere(shell[::2, ::2, ::2]) * 2
    gradient = np.stack(
        [ndi.sobel(depth, axis=a, mode="nearest")[tuple(conv.T)] for a in range(3)], axis=1
    )
    normal = gradient / (np.linalg.norm(gradient, axis=1, keepdims=True) + 1e-6)
    return _Sites(parenchyma=par, convexity=conv, surface_normal=normal.astype(np.float32))


# ---------------------------------------------------------------- helpers


def _crop(
    atlas: HeadAtlas, centre_mni: np.ndarray, half_mm: np.ndarray | float
) -> tuple[
    tuple[int, int, int], tuple[slice, slice, slice], tuple[np.ndarray, np.ndarray, np.ndarray]
]:
    centre = np.asarray(atlas.to_index(centre_mni))
    half = np.broadcast_to(np.asarray(half_mm, dtype=np.float64), (3,))
    lo = np.clip(np.floor(centre - half).astype(int), 0, np.asarray(atlas.shape) - 1)
    hi = np.clip(np.ceil(centre + half).astype(int) + 1, lo + 1, np.asarray(atlas.shape))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grid = tuple(
        (np.arange(a, b, dtype=np.float32) + np.float32(atlas.origin_mm[i])).reshape(
            [-1 if j == i else 1 for j in range(3)]
        )
        for i, (a, b) in enumerate(zip(lo, hi, strict=True))
    )
    return (int(lo[0]), int(lo[1]), int(lo[2])), sl, grid  # type: ignore[return-value]


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-6)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _blob_sdf(
    grid: tuple[np.ndarray, ...], centre: np.ndarray, radius: float, rng: np.random.Generator
) -> np.ndarray:
    """Approximate signed distance (mm) to an irregular lobulated blob."""
    rot = _random_rotation(rng)
    axes = rng.uniform(0.7, 1.3, 3)
    d = [grid[i] - np.float32(centre[i]) for i in range(3)]
    local = [
        sum(np.float32(rot[j, i]) * d[i] for i in range(3)) / np.float32(axes[j]) for j in range(3)
    ]
    r = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2) + np.float32(1e-3)
    bumps = np.zeros_like(r)
    for _ in range(int(rng.integers(3, 7))):
        n = rng.standard_normal(3)
        n /= np.linalg.norm(n)
        freq = rng.uniform(1.0, 3.0)
        cos = (local[0] * n[0] + local[1] * n[1] + local[2] * n[2]) / r
        bumps += np.float32(rng.uniform(0.05, 0.16)) * np.cos(
            np.float32(freq * np.pi) * cos + np.float32(rng.uniform(0, 2 * np.pi))
        )
    return (r - np.float32(radius) * (1.0 + bumps)) * np.float32(np.mean(axes))


def _blood_hu(
    shape: tuple[int, ...], rng: np.random.Generator, low: float = 58.0, high: float = 85.0
) -> np.ndarray:
    # acute clot density follows the hematocrit; a few HU of texture from clot retraction
    base = rng.uniform(low, high)
    return (base + rng.uniform(1.5, 4.0) * _smooth_noise(shape, rng, 1.5)).astype(np.float32)


def _crop_of(array: np.ndarray, sl: tuple[slice, slice, slice]) -> np.ndarray:
    return array[sl].astype(np.float32)


def _mni_point(values: Iterable[float]) -> tuple[float, float, float]:
    """A point's three MNI coordinates (mm) as a tuple of floats."""
    return cast(tuple[float, float, float], tuple(float(v) for v in values))


# ---------------------------------------------------------------- the five subtypes


def intraparenchymal(
    atlas: HeadAtlas, rng: np.random.Generator, gravity: np.ndarray
) -> LesionField:
    """A lobulated parenchymal hematoma (5-60 mm), with oedema and mass effect when large."""
    sites = _sites(atlas)
    diameter = float(np.exp(rng.uniform(np.log(5.0), np.log(60.0))))
    radius = diameter / 2.0
    if rng.random() < 0.4:  # hypertensive: basal ganglia / thalamus
        side = rng.choice([-1.0, 1.0])
        centre = np.array([side * rng.uniform(14, 28), rng.uniform(-22, 8), rng.uniform(-4, 10)])
    else:
        depths = atlas.inner_depth_mm[tuple(sites.parenchyma.T)]
        ok = sites.parenchyma[depths > min(radius * 0.7 + 4.0, 30.0)]
        centre = atlas.to_mni(ok[rng.integers(len(ok))] + rng.uniform(-1, 1, 3))
    half = radius * 1.6 + 12.0
    lo, sl, grid = _crop(atlas, centre, half)
    sdf = _blob_sdf(grid, centre, radius, rng)
    for _ in range(int(rng.integers(0, 3))):  # satellite lobes
        offset = rng.standard_normal(3)
        offset *= rng.uniform(0.4, 0.8) * radius / np.linalg.norm(offset)
        sdf = np.minimum(sdf, _blob_sdf(grid, centre + offset, radius * rng.uniform(0.4, 0.7), rng))
    ic = _crop_of(atlas.intracranial, sl) / 255.0
    fraction = np.clip(0.5 - sdf, 0.0, 1.0) * ic
    hu = _blood_hu(fraction.shape, rng)
    if diameter > 25 and rng.random() < 0.3:  # hematocrit level in a large clot
        dep = sum(np.float32(gravity[i]) * (grid[i] - np.float32(centre[i])) for i in range(3))
        hu += np.float32(rng.uniform(5, 10)) * (dep > rng.uniform(-0.2, 0.3) * radius)
    oedema = None
    if diameter > 12 and rng.random() < 0.75:
        width = rng.uniform(0.15, 0.4) * radius + 1.5
        tissue = (_crop_of(atlas.grey, sl) + _crop_of(atlas.white, sl)) / 255.0
        oedema = (np.clip(1.0 - sdf / np.float32(width), 0.0, 1.0) * (sdf > -0.5) * tissue).astype(
            np.float32
        )
    mass = None
    if diameter > 28:
        mass = MassEffect(
            _mni_point(centre),
            float(rng.uniform(0.15, 0.35) * radius),
            float(2.5 * radius + 15.0),
        )
    return LesionField(
        "intraparenchymal",
        lo,
        fraction.astype(np.float32),
        hu,
        oedema=oedema,
        oedema_hu=float(rng.uniform(14, 24)),
        mass_effect=mass,
        centre_mni=_mni_point(centre),
    )


def _extra_axial(atlas: HeadAtlas, rng: np.random.Generator, subtype: str) -> LesionField:
    sites = _sites(atlas)
    pick = int(rng.integers(len(sites.convexity)))
    surface = atlas.to_mni(sites.convexity[pick])
    normal = sites.surface_normal[pick].astype(np.float64)
    side = 1.0 if surface[0] > 0 else -1.0
    if subtype == "subdural":
        cap = rng.uniform(35.0, 80.0)
        thickness = float(np.exp(rng.uniform(np.log(3.0), np.log(20.0))))
    else:
        cap = rng.uniform(16.0, 35.0)
        thickness = min(rng.uniform(10.0, 30.0), 0.9 * cap)
    push = 0.45 * thickness if thickness > 7.0 else 0.0
    atlas_thickness = thickness - push  # the push widens the collection by about its amplitude
    lo, sl, grid = _crop(atlas, surface + normal * thickness * 0.5, cap + thickness + 12.0)
    d = np.sqrt(sum((grid[i] - np.float32(surface[i])) ** 2 for i in range(3)))
    ratio = np.clip(1.0 - (d / np.float32(cap)) ** 2, 0.0, 1.0)
    if subtype == "subdural":
        profile = np.float32(atlas_thickness) * ratio ** np.float32(0.8)  # tapering crescent
    else:
        profile = np.float32(atlas_thickness) * np.sqrt(ratio)  # biconvex lens
    depth = atlas.inner_depth_mm[sl]
    ic = _crop_of(atlas.intracranial, sl) / 255.0
    fraction = np.clip(profile - depth + 0.5, 0.0, 1.0) * ic * (profile > 0.3)
    # the falx stops a convexity collection at the midline; the tentorium keeps it supratentorial
    fraction *= np.clip(side * grid[0] - 1.0, 0.0, 1.0) * np.clip(grid[2] + 25.0, 0.0, 1.0)
    hu = _blood_hu(fraction.shape, rng, 55.0, 85.0)
    efface = (
        np.clip(1.0 - (depth - profile) / 12.0, 0.0, 1.0) * (ratio > 0) * (depth > profile - 1)
    ).astype(np.float32)
    centre = surface + normal * thickness * 0.5
    mass = (
        MassEffect(_mni_point(surface), float(push), float(cap + 2.0 * thickness)) if push else None
    )
    return LesionField(
        subtype,
        lo,
        fraction.astype(np.float32),
        hu,
        effacement=efface * 0.8,
        mass_effect=mass,
        centre_mni=_mni_point(centre),
    )


def subdural(atlas: HeadAtlas, rng: np.random.Generator, gravity: np.ndarray) -> LesionField:
    """A crescent along the inner table (3-20 mm thick) over the convexity, stopped by the falx."""
    return _extra_axial(atlas, rng, "subdural")


def epidural(atlas: HeadAtlas, rng: np.random.Generator, gravity: np.ndarray) -> LesionField:
    """A compact biconvex lens against the inner table (10-30 mm thick)."""
    return _extra_axial(atlas, rng, "epidural")


def subarachnoid(atlas: HeadAtlas, rng: np.random.Generator, gravity: np.ndarray) -> LesionField:
    """Blood in the sulci, fissures and basal cisterns near a centre (replaces their CSF)."""
    sites = _sites(atlas)
    choice = rng.random()
    if choice < 0.35:  # basal cisterns (aneurysmal pattern)
        centre = np.array([rng.uniform(-6, 6), rng.uniform(-25, 12), rng.uniform(-16, -4)])
        spread = rng.uniform(14.0, 28.0)
    elif choice < 0.6:  # sylvian fissure
        centre = np.array(
            [rng.choice([-1, 1]) * rng.uniform(32, 44), rng.uniform(-5, 18), rng.uniform(-8, 6)]
        )
        spread = rng.uniform(10.0, 22.0)
    else:  # convexity sulci (traumatic pattern)
        pick = int(rng.integers(len(sites.convexity)))
        centre = atlas.to_mni(sites.convexity[pick]) + sites.surface_normal[pick] * 8.0
        spread = rng.uniform(10.0, 25.0)
    lo, sl, grid = _crop(atlas, centre, 2.6 * spread)
    r2 = sum((grid[i] - np.float32(centre[i])) ** 2 for i in range(3))
    envelope = np.exp(-r2 / np.float32(2.0 * spread**2))
    envelope = np.clip((envelope - 0.15) / 0.5, 0.0, 1.0)
    tissue = (_crop_of(atlas.grey, sl) + _crop_of(atlas.white, sl)) / 255.0
    ic = _crop_of(atlas.intracranial, sl) / 255.0
    csf = np.clip(1.0 - tissue, 0.0, 1.0) * ic * (1.0 - _crop_of(atlas.ventricles, sl) / 255.0)
    fill = np.float32(rng.uniform(0.85, 1.0))
    fraction = np.clip(2.2 * csf - 0.1, 0.0, 1.0) * envelope * fill
    hu = _blood_hu(fraction.shape, rng, 60.0, 85.0)
    return LesionField(
        "subarachnoid",
        lo,
        fraction.astype(np.float32),
        hu,
        centre_mni=_mni_point(centre),
    )


def intraventricular(
    atlas: HeadAtlas, rng: np.random.Generator, gravity: np.ndarray
) -> LesionField:
    """Blood layering in the dependent part of a lateral ventricle (or a cast filling it)."""
    sides = ["left", "right"] if rng.random() < 0.5 else [str(rng.choice(["left", "right"]))]
    centres = [np.asarray(atlas.landmarks[f"lateral_ventricle_{s}"]) for s in sides]
    centre = np.mean(centres, axis=0)
    lo, sl, grid = _crop(atlas, centre, np.array([45.0, 60.0, 40.0]))
    vent = _crop_of(atlas.ventricles, sl) / 255.0
    side_mask = np.zeros_like(vent)
    for s in sides:
        side_mask += (grid[0] * (1.0 if s == "left" else -1.0) > -1.0).astype(
            np.float32
        ) * np.ones_like(vent)
    vent *= np.clip(side_mask, 0, 1)
    dep = sum(
        np.float32(gravity[i]) * (grid[i] - np.float32(centre[i])) for i in range(3)
    ) * np.ones_like(vent)
    inside = vent > 0.5
    if not inside.any():
        raise ValueError("atlas has no lateral ventricle near its landmark")
    if rng.random() < 0.2:  # a cast
        level = np.percentile(dep[inside], rng.uniform(5, 40))
    else:  # a fluid level in the dependent horns
        level = np.percentile(dep[inside], rng.uniform(70, 92))
    layer = np.clip(dep - np.float32(level) + 0.5, 0.0, 1.0)
    fraction = (vent * layer).astype(np.float32)
    hu = _blood_hu(fraction.shape, rng, 60.0, 85.0)
    return LesionField("intraventricular", lo, fraction, hu, centre_mni=_mni_point(centre))


MAKERS = {
    "intraparenchymal": intraparenchymal,
    "subdural": subdural,
    "epidural": epidural,
    "subarachnoid": subarachnoid,
    "intraventricular": intraventricular,
}


def draw_subtypes(
    rng: np.random.Generator,
    weights: tuple[float, ...] = SUBTYPE_WEIGHTS,
    *,
    count: int | None = None,
) -> tuple[str, ...]:
    """The subtypes of one positive case: ``count`` lesions (default 1-3, mostly 1) drawn by
    ``weights`` (in ``SUBTYPES`` order). Both generator modes draw through here."""
    n = count if count is not None else int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    return tuple(str(s) for s in rng.choice(SUBTYPES, size=n, p=weights))


def sample_hemorrhages(
    atlas: HeadAtlas,
    rng: np.random.Generator,
    gravity: np.ndarray,
    *,
    count: int | None = None,
    subtypes: tuple[str, ...] | None = None,
    weights: tuple[float, ...] = SUBTYPE_WEIGHTS,
) -> list[LesionField]:
    """1-3 hemorrhages of mixed subtypes (or exactly ``subtypes``).

    Parameters
    ----------
    atlas : HeadAtlas
        The head atlas.
    rng : np.random.Generator
        The case's lesion random stream.
    gravity : np.ndarray
        Unit vector of gravity in MNI space (dependent direction of a supine patient).
    count : int, optional
        Number of lesions (default: 1-3, mostly 1).
    subtypes : tuple of str, optional
        Force these subtypes (one lesion each).
    weights : tuple of float
        Relative frequency of each subtype, in ``SUBTYPES`` order, when not forced.

    Returns
    -------
    list of LesionField

    Raises
    ------
    ValueError
        When a subtype is unknown.
    """
    if subtypes is None:
        subtypes = draw_subtypes(rng, weights, count=count)
    unknown = [s for s in subtypes if s not in MAKERS]
    if unknown:
        raise ValueError(f"unknown hemorrhage subtype(s) {unknown}; expected {SUBTYPES}")
    lesions = []
    for subtype in subtypes:
        for _ in range(10):
            lesion = MAKERS[subtype](atlas, rng, gravity)
            if lesion.volume_ml > 0.02:  # at least a few voxels of blood
                break
        lesions.append(lesion)
    return lesions


# ---------------------------------------------------------------- mimics


def sample_mimics(atlas: HeadAtlas, rng: np.random.Generator) -> list[LesionField]:
    """Normal hyperdense findings that are not blood: physiological calcifications and the like.

    At least one calcification (> 100 HU) is always present, in positive and negative cases alike.

    Parameters
    ----------
    atlas : HeadAtlas
        The head atlas.
    rng : np.random.Generator
        The case's mimic random stream (independent of the hemorrhage stream).

    Returns
    -------
    list of LesionField
        Each with ``is_blood`` False.
    """
    mimics: list[LesionField] = []
    pineal = rng.random() < 0.75
    choroid = rng.random() < 0.7
    if not (pineal or choroid):
        pineal = True
    if pineal:
        mimics.append(
            _calcification(atlas, rng, atlas.landmarks["pineal"], rng.uniform(2.0, 4.5), (150, 450))
        )
    if choroid:
        for side in ("left", "right"):
            if rng.random() < 0.85:
                mimics.append(
                    _calcification(
                        atlas,
                        rng,
                        atlas.landmarks[f"choroid_{side}"],
                        rng.uniform(2.0, 4.5),
                        (120, 350),
                    )
                )
    if rng.random() < 0.15:  # basal ganglia (pallidal) calcification, bilateral
        for side in ("left", "right"):
            mimics.append(
                _calcification(
                    atlas,
                    rng,
                    atlas.landmarks[f"pallidum_{side}"],
                    rng.uniform(1.5, 3.5),
                    (110, 250),
                )
            )
    if rng.random() < 0.12:  # falx calcification / ossification plaque
        centre = (rng.uniform(-0.5, 0.5), rng.uniform(-40, 30), rng.uniform(30, 60))
        mimics.append(
            _calcification(atlas, rng, centre, rng.uniform(1.5, 3.0), (200, 700), flat=True)
        )
    if rng.random() < 0.05:  # calcified meningioma (dural based)
        sites = _sites(atlas)
        pick = int(rng.integers(len(sites.convexity)))
        centre = atlas.to_mni(sites.convexity[pick]) + sites.surface_normal[pick] * rng.uniform(
            4, 9
        )
        mimic = _calcification(atlas, rng, centre, rng.uniform(5, 11), (150, 500))
        mimics.append(
            LesionField(
                "meningioma",
                mimic.lo,
                mimic.fraction,
                mimic.hu,
                centre_mni=mimic.centre_mni,
                is_blood=False,
            )
        )
    return mimics


def _calcification(
    atlas: HeadAtlas,
    rng: np.random.Generator,
    centre: tuple[float, float, float],
    radius: float,
    hu_range: tuple[float, float],
    *,
    flat: bool = False,
) -> LesionField:
    centre_arr = np.asarray(centre, dtype=np.float64) + rng.uniform(-1.0, 1.0, 3)
    lo, sl, grid = _crop(atlas, centre_arr, radius * 2.0 + 3.0)
    sdf = _blob_sdf(grid, centre_arr, radius, rng)
    if flat:
        sdf = np.maximum(sdf, np.abs(grid[0] - np.float32(centre_arr[0])) - 0.6)
    fraction = np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)
    hu = np.full(fraction.shape, rng.uniform(*hu_range), dtype=np.float32)
    return LesionField(
        "calcification",
        lo,
        fraction,
        hu,
        centre_mni=tuple(float(v) for v in centre_arr),  # type: ignore[arg-type]
        is_blood=False,
    )


# ---------------------------------------------------------------- rendering


def render_lesions(
    hu: np.ndarray, atlas: HeadAtlas, lesions: list[LesionField], tissue: TissueHU
) -> None:
    """Write lesions (and mimics) into a case's atlas-grid HU volume, in place.

    Oedema and sulcal effacement change the tissue around a lesion first; the blood (or
    calcification) then replaces each voxel's content by its fraction (partial volume).

    Parameters
    ----------
    hu : np.ndarray
        The case's float32 HU volume on the atlas grid; modified in place.
    atlas : HeadAtlas
        The atlas the lesions were sampled on.
    lesions : list of LesionField
        Hemorrhages and mimics.
    tissue : TissueHU
        The case's tissue densities (grey matter replaces effaced CSF).

    Raises
    ------
    ValueError
        When ``hu`` is not on the atlas grid.
    """
    if hu.shape != atlas.shape:
        raise ValueError(f"HU volume shape {hu.shape} is not the atlas grid {atlas.shape}")
    for lesion in lesions:
        sl = lesion.slices
        view = hu[sl]
        if lesion.effacement is not None:
            tissue_frac = (
                atlas.grey[sl].astype(np.float32) + atlas.white[sl].astype(np.float32)
            ) / 255.0
            ic = atlas.intracranial[sl].astype(np.float32) / 255.0
            csf = np.clip(1.0 - tissue_frac, 0.0, 1.0) * ic * (atlas.inner_depth_mm[sl] > 1.5)
            view += lesion.effacement * csf * np.float32(tissue.grey - tissue.csf)
        if lesion.oedema is not None:
            view += (
                lesion.oedema
                * np.float32(0.8)
                * (np.float32(lesion.oedema_hu) - view)
                * (view < 60)
            )
        view += lesion.fraction * (lesion.hu - view)
