"""A normal adult head in Hounsfield units on a 1 mm grid, built from the MNI152 2009a templates.

The grey- and white-matter probability maps and the skull-stripped T1 that ship with nilearn give
the brain; skull, scalp, skull base, face and neck are built around it. The atlas is built once per
process and then only read: each synthetic case composes its own HU volume from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from radnet_node.errors import DatasetError

ATLAS_VERSION = "mni152-2009a-head-v1"
logger = logging.getLogger(__name__)

# padding (voxels = mm) added to the MNI grid: (low, high) per axis x (R), y (A), z (S);
# the template stops at z = -72 mm, the skull base and upper neck lie below
_PAD = ((4, 4), (6, 14), (34, 0))
_TEMPLATES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# landmarks in MNI mm (RAS) for physiological calcifications; snapped to the atlas when built
PINEAL_MNI = (0.0, -30.0, 2.0)
CHOROID_PLEXUS_MNI = ((27.0, -40.0, 12.0), (-27.0, -40.0, 12.0))
GLOBUS_PALLIDUS_MNI = ((19.0, -3.0, -1.0), (-19.0, -3.0, -1.0))


@dataclass(frozen=True, eq=False)
class HeadAtlas:
    """The normal head on a 1 mm grid in MNI152 space (RAS, mm); arrays are indexed (x, y, z).

    Fractions are stored as uint8 (0-255 = 0-1) to keep a worker's memory small.

    Attributes
    ----------
    origin_mm : np.ndarray
        MNI coordinate of voxel (0, 0, 0); the grid spacing is 1 mm along every axis.
    intracranial : np.ndarray
        Fraction of the voxel inside the inner table of the skull (uint8).
    grey, white : np.ndarray
        Grey- and white-matter fractions of the intracranial part (uint8); CSF is the rest.
    ventricles : np.ndarray
        Ventricular CSF (uint8 fraction).
    csf_smooth : np.ndarray
        CSF fraction smoothed over ~2 mm inside the brain (uint8): where sulci widen with atrophy.
    extracranial_hu : np.ndarray
        HU of everything outside the cranial cavity (skull, scalp, face, neck, air), float32.
    inner_depth_mm : np.ndarray
        Signed distance to the inner table (mm, float32): positive inside the cranial cavity.
    falx, venous_sinus : np.ndarray
        Dural falx sheet and the superior sagittal / transverse sinuses (uint8 fractions).
    landmarks : dict[str, tuple[float, float, float]]
        MNI positions (mm) of the pineal gland, choroid plexus, globus pallidus, ventricle centres.
    """

    origin_mm: np.ndarray
    intracranial: np.ndarray
    grey: np.ndarray
    white: np.ndarray
    ventricles: np.ndarray
    csf_smooth: np.ndarray
    extracranial_hu: np.ndarray
    inner_depth_mm: np.ndarray
    falx: np.ndarray
    venous_sinus: np.ndarray
    landmarks: dict[str, tuple[float, float, float]]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.intracranial.shape)  # type: ignore[return-value]

    def to_index(self, mni_mm: np.ndarray) -> np.ndarray:
        """Voxel indices (float) of MNI coordinates (..., 3)."""
        return np.asarray(mni_mm, dtype=np.float64) - self.origin_mm

    def to_mni(self, index: np.ndarray) -> np.ndarray:
        """MNI coordinates (mm) of voxel indices (..., 3)."""
        return np.asarray(index, dtype=np.float64) + self.origin_mm

    def axis_mm(self, axis: int) -> np.ndarray:
        """MNI coordinates (mm) of the voxel centres along one axis."""
        return np.arange(self.shape[axis], dtype=np.float32) + np.float32(self.origin_mm[axis])


def _load_template(name: str) -> tuple[np.ndarray, np.ndarray]:
    resource = resources.files("nilearn.datasets") / "data" / _TEMPLATES[name]
    try:
        with resources.as_file(resource) as path:
            image = nib.load(path)
            data = np.asarray(image.dataobj, dtype=np.float32) / 255.0
            affine = np.asarray(image.affine, dtype=np.float64)
    except (OSError, nib.filebasedimages.ImageFileError) as error:
        raise DatasetError(f"MNI152 template {resource}: cannot be read ({error})") from error
    if not np.allclose(np.diag(affine)[:3], 1.0):
        raise DatasetError(
            f"MNI152 template {resource}: expected a 1 mm RAS grid, got affine {affine.tolist()}"
        )
    return data, affine


def _fraction(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(a) * 255.0), 0, 255).astype(np.uint8)


def _ellipsoid(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:
    """Soft (1 mm edge) fraction of an axis-aligned ellipsoid on open MNI grids."""
    x, y, z = grid
    r = np.sqrt(
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    )
    return np.clip((1.0 - r) * min(radii) + 0.5, 0.0, 1.0).astype(np.float32)


def _capsule(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    start: tuple[float, float, float],
    end: tuple[float, float, float],
    radius: float,
) -> np.ndarray:
    """Voxels within ``radius`` mm of the segment start-end (MNI mm), vertically flattened."""
    x, y, z = grid
    a = np.asarray(start, dtype=np.float32)
    d = np.asarray(end, dtype=np.float32) - a
    t = np.clip(
        ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / float(d @ d), 0.0, 1.0
    )
    dist2 = (
        (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (1.6 * (z - a[2] - t * d[2])) ** 2
    )
    return dist2 <= radius**2


def _smooth_field(shape: tuple[int, ...], sigma: float, seed: int) -> np.ndarray:
    """Smooth zero-mean unit-variance noise (fixed seed: the atlas is the same in every process)."""
    rng = np.random.default_rng(seed)
    coarse_shape = tuple(max(4, int(np.ceil(n / sigma)) + 2) for n in shape)
    coarse = ndi.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0)
    zoom = [n / c for n, c in zip(shape, coarse_shape, strict=True)]
    field = ndi.zoom(coarse, zoom, order=1)[tuple(slice(0, n) for n in shape)]
    return (field - field.mean()) / (field.std() + 1e-6)


_ARRAYS = (
    "origin_mm",
    "intracranial",
    "grey",
    "white",
    "ventricles",
    "csf_smooth",
    "extracranial_hu",
    "inner_depth_mm",
    "falx",
    "venous_sinus",
)


def _cache_dir() -> Path:
    root = os.environ.get("RADNET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "radnet-node"
    )
    # the key changes with this module's code, so an edited builder never reads a stale atlas
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return Path(root) / f"atlas-{ATLAS_VERSION}-{digest}"


@functools.lru_cache(maxsize=1)
def head_atlas() -> HeadAtlas:
    """The normal-head atlas: built once from the MNI152 2009a templates, then cached.

    The built arrays are kept on disk (``$RADNET_CACHE_DIR``, default ``~/.cache/radnet-node``)
    and memory-mapped read-only, so parallel workers share one copy; building takes ~20 s.

    Returns
    -------
    HeadAtlas
        Read-only arrays on a 1 mm MNI grid.

    Raises
    ------
    DatasetError
        When a template file shipped with nilearn is missing or unreadable.
    """
    folder = _cache_dir()
    if (folder / "landmarks.json").is_file():
        try:
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
            landmarks = {
                k: tuple(v) for k, v in json.loads((folder / "landmarks.json").read_text()).items()
            }
            arrays["origin_mm"] = np.asarray(arrays["origin_mm"])
            return HeadAtlas(landmarks=landmarks, **arrays)  # type: ignore[arg-type]
        except (OSError, ValueError) as error:
            logger.warning("atlas cache %s is unreadable (%s); rebuilding it", folder, error)
    atlas = build_head_atlas()
    tmp: Path | None = None
    try:
        tmp = Path(
            tempfile.mkdtemp(
                prefix=folder.name + ".",
                dir=folder.parent if folder.parent.exists() else _mkdir(folder.parent),
            )
        )
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", np.asarray(getattr(atlas, name)))
        (tmp / "landmarks.json").write_text(json.dumps(atlas.landmarks))
        os.replace(tmp, folder)
    except OSError as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial copy is never left behind
        if (folder / "landmarks.json").is_file():
            # another process built it at the same time and put its copy in place first
            logger.debug("atlas cache %s was written by another process", folder)
        else:
            logger.warning(
                "atlas cache %s cannot be written (%s); every process will rebuild it",
                folder,
                error,
            )
    return atlas


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_head_atlas() -> HeadAtlas:
    """Build the normal-head atlas from the MNI152 2009a templates (no cache; ~20 s).

    Returns
    -------
    HeadAtlas
        Arrays on a 1 mm MNI grid.

    Raises
    ------
    DatasetError
        When a template file shipped with nilearn is missing or unreadable.
    """
    t1, affine = _load_template("t1")
    grey, _ = _load_template("gm")
    white, _ = _load_template("wm")
    t1, grey, white = (np.pad(a, _PAD) for a in (t1, grey, white))
    origin = affine[:3, 3] - np.array([p[0] for p in _PAD], dtype=np.float64)
    shape = t1.shape
    x = (np.arange(shape[0], dtype=np.float32) + origin[0])[:, None, None]
    y = (np.arange(shape[1], dtype=np.float32) + origin[1])[None, :, None]
    z = (np.arange(shape[2], dtype=np.float32) + origin[2])[None, None, :]
    grid = (x, y, z)

    # brain: the template's head-free mask, one component, holes filled
    brain = t1 > 0.2
    labels, count = ndi.label(brain)
    if count == 0:
        raise DatasetError("MNI152 T1 template: no brain voxels above threshold")
    sizes = ndi.sum_labels(brain, labels, index=np.arange(1, count + 1))
    brain = labels == (1 + int(np.argmax(sizes)))
    brain = ndi.binary_fill_holes(brain)
    # the template cuts the medulla at its lowest plane: continue it as the spinal cord
    k0 = _PAD[2][0]
    cord = brain[:, :, k0] & (np.abs(x[:, :, 0]) < 14) & (y[:, :, 0] > -60) & (y[:, :, 0] < -20)
    brain[:, :, :k0] = cord[:, :, None]
    grey[:, :, :k0] = 0.15 * cord[:, :, None]
    white[:, :, :k0] = 0.85 * cord[:, :, None]
    grey *= brain
    white *= brain
    tissue = np.clip(grey + white, 0.0, 1.0)

    # cranial cavity: a closing of the brain (bridges fissures and cisterns) plus a ~2 mm CSF gap
    dist_out_brain = ndi.distance_transform_edt(~brain).astype(np.float32)
    hull = dist_out_brain <= 9.0
    cranial = ndi.distance_transform_edt(hull).astype(np.float32) > 7.0
    # skull base: where the closed hull leaves wide spaces between lobes low down (petrous ridges,
    # sphenoid wings, clivus), the space is bone, except the midline basal cisterns
    base_bone = cranial & (dist_out_brain > 3.0) & (z < -18.0) & (np.abs(x) > 11.0)
    clivus = (
        cranial
        & (dist_out_brain > 2.0)
        & (z < -22.0)
        & (np.abs(x) <= 11.0)
        & (y > -28.0)
        & (y < -5.0)
    )
    # petrous ridges: oblique bony bars between the temporal lobes and the cerebellum
    petrous_ridge = _capsule(grid, (58.0, -36.0, -36.0), (17.0, -17.0, -29.0), 6.5) | _capsule(
        grid, (-58.0, -36.0, -36.0), (-17.0, -17.0, -29.0), 6.5
    )
    cranial &= ~(base_bone | clivus | (petrous_ridge & (dist_out_brain > 1.0)))
    cranial = ndi.binary_opening(cranial, iterations=1) | brain
    depth_in = ndi.distance_transform_edt(cranial).astype(np.float32)
    depth_out = ndi.distance_transform_edt(~cranial).astype(np.float32)
    inner_depth = np.where(cranial, depth_in - 0.5, -(depth_out - 0.5)).astype(np.float32)
    intracranial = np.clip(inner_depth + 0.5, 0.0, 1.0)

    # ventricles: deep, dark on T1, mostly CSF
    csf = np.clip(1.0 - tissue, 0.0, 1.0) * brain
    brain_depth = ndi.distance_transform_edt(ndi.binary_closing(brain, iterations=3)).astype(
        np.float32
    )
    # deep enough that the sylvian fissures and the basal cisterns (also CSF) stay out
    ventricles = (
        (csf > 0.5) & (t1 < 0.45) & (brain_depth > 10.0) & (inner_depth > 24.0) & (z > -30.0)
    )
    ventricles &= np.abs(x) < 32.0
    ventricles = ndi.binary_opening(ventricles, iterations=1)
    labels, count = ndi.label(ventricles)
    if count:
        sizes = ndi.sum_labels(ventricles, labels, index=np.arange(1, count + 1))
        keep = 1 + np.flatnonzero(sizes >= 150)
        ventricles = np.isin(labels, keep)
    ventricle_fraction = ndi.gaussian_filter(ventricles.astype(np.float32), 0.7) * (csf > 0.3)
    csf_smooth = ndi.gaussian_filter(csf, 1.5) * brain

    # skull: thickness 3.5-8 mm (thin temporal squama, thick occiput and base), tables and diploe
    thickness = 4.6 + 0.8 * _smooth_field(shape, 25.0, seed=11)
    thickness += 1.2 * np.clip((-y - 60.0) / 40.0, 0.0, 1.0)  # occiput
    thickness -= 2.2 * np.clip((np.abs(x) - 45.0) / 15.0, 0.0, 1.0) * (np.abs(z + 5.0) < 28.0)
    thickness += 2.0 * np.clip((-z - 20.0) / 20.0, 0.0, 1.0)  # skull base
    thickness = np.clip(thickness, 3.0, 9.0)
    d_bone = depth_out  # distance outside the cranial cavity
    u = d_bone / thickness
    table = 1.6
    cortical = np.clip(np.minimum(d_bone, thickness - d_bone) / table, 0.0, 1.0)
    bone_hu = 1350.0 + 150.0 * _smooth_field(shape, 15.0, seed=12)
    diploe_hu = 480.0 + 90.0 * _smooth_field(shape, 6.0, seed=13)
    skull_hu = cortical * diploe_hu + (1.0 - cortical) * bone_hu
    skull_hu = np.where(u < 0.5, np.maximum(skull_hu, bone_hu * (d_bone < table)), skull_hu)
    skull_frac = np.clip(thickness - d_bone + 0.5, 0.0, 1.0) * (~cranial)
    # petrous bone is the densest of the skull
    petrous = _ellipsoid(grid, (38.0, -28.0, -32.0), (16.0, 9.0, 7.0)) + _ellipsoid(
        grid, (-38.0, -28.0, -32.0), (16.0, 9.0, 7.0)
    )
    skull_hu = skull_hu + 500.0 * np.clip(petrous, 0, 1) * skull_frac

    # scalp: skin, subcutaneous fat, galea / temporalis muscle
    scalp_thickness = 5.5 + 1.0 * _smooth_field(shape, 30.0, seed=14)
    scalp_thickness += (
        8.0
        * np.clip((np.abs(x) - 50.0) / 10.0, 0.0, 1.0)
        * np.clip((30.0 - np.abs(z - 0.0)) / 15.0, 0, 1)
    )
    scalp_thickness += 5.0 * np.clip((-z - 30.0) / 20.0, 0.0, 1.0) * (y < -40)  # neck muscles
    s = d_bone - thickness
    scalp_frac = np.clip(scalp_thickness - s + 0.5, 0.0, 1.0) * (s > -0.5)
    fat_layer = np.clip(
        1.0 - np.abs(s - 0.45 * scalp_thickness) / (0.2 * scalp_thickness + 0.5), 0.0, 1.0
    )
    scalp_hu = 45.0 * (1.0 - fat_layer) + (-95.0) * fat_layer

    # face and upper neck below the skull base: soft tissue with fat, sinuses and orbits
    neck = _ellipsoid(grid, (0.0, -22.0, -95.0), (58.0, 55.0, 60.0)) * (z < -40.0)
    face = _ellipsoid(grid, (0.0, 35.0, -60.0), (55.0, 62.0, 45.0)) * (z < -5.0)
    lower = np.clip(neck + face, 0.0, 1.0) * (~cranial)
    lower_hu = 35.0 - 60.0 * np.clip(_smooth_field(shape, 8.0, seed=15), 0.0, 1.5)
    air_spaces = np.clip(
        _ellipsoid(grid, (0.0, 18.0, -30.0), (10.0, 12.0, 9.0))  # sphenoid sinus
        + _ellipsoid(grid, (0.0, 45.0, -35.0), (12.0, 20.0, 14.0))  # ethmoid cells / nasal cavity
        + _ellipsoid(grid, (0.0, 68.0, 10.0), (14.0, 5.0, 9.0))  # frontal sinus
        + _ellipsoid(grid, (30.0, 40.0, -62.0), (14.0, 16.0, 16.0))  # maxillary sinuses
        + _ellipsoid(grid, (-30.0, 40.0, -62.0), (14.0, 16.0, 16.0))
        + 0.7 * _ellipsoid(grid, (50.0, -35.0, -38.0), (9.0, 10.0, 9.0))  # mastoid air cells
        + 0.7 * _ellipsoid(grid, (-50.0, -35.0, -38.0), (9.0, 10.0, 9.0)),
        0.0,
        1.0,
    ) * (~cranial)
    orbit_fat = np.clip(
        _ellipsoid(grid, (31.0, 48.0, -36.0), (18.0, 26.0, 17.0))
        + _ellipsoid(grid, (-31.0, 48.0, -36.0), (18.0, 26.0, 17.0)),
        0.0,
        1.0,
    ) * (~cranial)
    globes = np.clip(
        _ellipsoid(grid, (32.0, 62.0, -36.0), (12.0, 12.0, 12.0))
        + _ellipsoid(grid, (-32.0, 62.0, -36.0), (12.0, 12.0, 12.0)),
        0.0,
        1.0,
    )

    # compose everything outside the cranial cavity, innermost layer last
    extra = np.full(shape, -1000.0, dtype=np.float32)
    extra = extra * (1 - lower) + lower * lower_hu
    extra = extra * (1 - scalp_frac) + scalp_frac * scalp_hu
    extra = extra * (1 - orbit_fat) + orbit_fat * (-90.0)
    extra = extra * (1 - globes) + globes * 12.0
    extra = extra * (1 - skull_frac) + skull_frac * skull_hu
    extra = extra * (1 - air_spaces * (1 - globes)) + air_spaces * (1 - globes) * (-950.0)
    # bone septa inside air cells and a thin mucosa keep sinuses from looking like holes
    extra += 250.0 * air_spaces * skull_frac * np.clip(_smooth_field(shape, 2.5, seed=16), 0, 1.5)

    # dura: falx in the interhemispheric fissure, superior sagittal and transverse sinuses
    falx = (
        np.exp(-0.5 * (x / 0.7) ** 2)
        * cranial
        * (csf > 0.25)
        * (z > -8.0 + 0.25 * np.maximum(y + 20.0, 0))
        * (y > -100.0)
        * (y < 62.0)
    )
    sss = cranial & (inner_depth < 6.0) & (np.abs(x) < 5.0 - 0.7 * inner_depth) & (z > -15.0)
    transverse = (
        cranial
        & (inner_depth < 5.0)
        & (y < -70.0)
        & (np.abs(z - (-8.0 + 0.12 * np.abs(x))) < 3.5)
        & (np.abs(x) < 60.0)
    )
    venous = ndi.gaussian_filter((sss | transverse).astype(np.float32), 0.6)

    landmarks = {
        "pineal": _snap(PINEAL_MNI, csf_smooth, origin, 6),
        "choroid_left": _snap(CHOROID_PLEXUS_MNI[0], ventricle_fraction, origin, 10),
        "choroid_right": _snap(CHOROID_PLEXUS_MNI[1], ventricle_fraction, origin, 10),
        "pallidum_left": GLOBUS_PALLIDUS_MNI[0],
        "pallidum_right": GLOBUS_PALLIDUS_MNI[1],
    }
    vent_idx = np.argwhere(ventricles & (np.abs(x) > 4) & (z > 0))
    for side, sign in (("left", 1.0), ("right", -1.0)):
        pts = vent_idx[(vent_idx[:, 0] + origin[0]) * sign > 0]
        centre = pts.mean(axis=0) + origin if len(pts) else np.array([sign * 15.0, -10.0, 15.0])
        landmarks[f"lateral_ventricle_{side}"] = tuple(float(v) for v in centre)

    return HeadAtlas(
        origin_mm=origin,
        intracranial=_fraction(intracranial),
        grey=_fraction(grey * cranial),
        white=_fraction(white * cranial),
        ventricles=_fraction(ventricle_fraction),
        csf_smooth=_fraction(csf_smooth),
        extracranial_hu=extra.astype(np.float32),
        inner_depth_mm=inner_depth,
        falx=_fraction(falx),
        venous_sinus=_fraction(venous),
        landmarks=landmarks,
    )


def _snap(
    point: tuple[float, float, float], weight: np.ndarray, origin: np.ndarray, radius: int
) -> tuple[float, float, float]:
    """Move a landmark to the weighted centre of ``weight`` near it (the atlas's own anatomy)."""
    centre = np.rint(np.asarray(point) - origin).astype(int)
    lo = np.maximum(centre - radius, 0)
    hi = np.minimum(centre + radius + 1, weight.shape)
    crop = weight[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float64)
    if crop.sum() <= 0:
        return tuple(float(v) for v in point)  # type: ignore[return-value]
    com = np.asarray(ndi.center_of_mass(crop)) + lo + origin
    return tuple(float(v) for v in com)  # type: ignore[return-value]


@dataclass(frozen=True)
class TissueHU:
    """Per-case mean densities (HU) of the normal tissues."""

    grey: float = 38.0
    white: float = 28.0
    csf: float = 5.0
    bone_factor: float = 1.0
    venous_blood: float = 50.0
    falx_extra: float = 25.0
    inner_table_rim: float = 3.0


def compose_head_hu(atlas: HeadAtlas, tissue: TissueHU, atrophy: float = 0.0) -> np.ndarray:
    """Noise-free HU volume of the normal head on the atlas grid for one case.

    Parameters
    ----------
    atlas : HeadAtlas
        The shared atlas.
    tissue : TissueHU
        The case's tissue densities.
    atrophy : float
        0 (none) to 1 (marked): tissue next to CSF turns into CSF (wider sulci).

    Returns
    -------
    np.ndarray
        float32 HU, indexed (x, y, z) like the atlas.
    """
    scale = np.float32(1.0 / 255.0)
    ic = atlas.intracranial.astype(np.float32) * scale
    grey = atlas.grey.astype(np.float32) * scale
    white = atlas.white.astype(np.float32) * scale
    if atrophy > 0:
        keep = 1.0 - np.float32(atrophy) * np.clip(
            atlas.csf_smooth.astype(np.float32) * (scale * 2.2), 0, 1
        )
        grey *= keep
        white *= keep
    brain = (
        np.float32(tissue.csf)
        + grey * np.float32(tissue.grey - tissue.csf)
        + white * np.float32(tissue.white - tissue.csf)
    )
    del grey, white
    # blood in dural sinuses and a dense falx are normal; a residual beam-hardening rim along the
    # inner table is a well-known subdural mimic
    brain += atlas.venous_sinus.astype(np.float32) * np.float32(
        scale * (tissue.venous_blood - tissue.csf)
    )
    brain += atlas.falx.astype(np.float32) * np.float32(scale * tissue.falx_extra)
    if tissue.inner_table_rim != 0:
        brain += np.float32(tissue.inner_table_rim) * np.exp(
            -np.maximum(atlas.inner_depth_mm, 0) / 2.5
        )
    extra = atlas.extracranial_hu
    if tissue.bone_factor != 1.0:
        extra = extra + np.float32(tissue.bone_factor - 1.0) * np.maximum(extra - 100.0, 0.0)
    return (extra * (1.0 - ic) + brain * ic).astype(np.float32, copy=False)
