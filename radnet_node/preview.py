"""A quick-look PNG of a result: a few source slices in the brain window with the hemorrhage mask
overlaid and each slice's probability in its title. For humans checking a run, not for diagnosis.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from radnet_node.results import SeriesResult

__all__ = ["preview_png", "render_preview", "select_preview_slices"]

_OVERLAY_RGB = np.array([255, 40, 40], dtype=np.float32)
_OVERLAY_ALPHA = 0.45
_TITLE_PX = 18
_HEADER_PX = 22


def select_preview_slices(result: SeriesResult, max_slices: int = 4) -> tuple[int, ...]:
    """Slice indices to show: the most probable positive slices, else evenly spaced ones.

    Parameters
    ----------
    result
        The series result.
    max_slices
        At most this many slices.

    Returns
    -------
    tuple of int
        Ascending source-slice indices.

    Raises
    ------
    ValueError
        If ``max_slices`` is below 1.
    """
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    n = len(result.slice_probabilities)
    positive = np.flatnonzero(result.slice_positive)
    if positive.size:
        by_probability = positive[np.argsort(-result.slice_probabilities[positive], kind="stable")]
        chosen = by_probability[:max_slices]
    else:
        count = min(max_slices, n)
        # interior points of an even split: the first and last slices are mostly skull base/vertex
        chosen = np.unique(np.round(np.linspace(0, n - 1, count + 2)[1:-1]).astype(int))
    return tuple(sorted(int(i) for i in chosen))


def render_preview(
    result: SeriesResult, hu: np.ndarray, *, max_slices: int = 4, tile_px: int = 256
) -> Image.Image:
    """Render the preview image.

    Parameters
    ----------
    result
        The series result (mask and probabilities on the source grid, source-slice order).
    hu
        (n, rows, columns) Hounsfield units of the same slices, same order.
    max_slices
        Tiles in the row.
    tile_px
        Longest side of one tile in pixels.

    Returns
    -------
    PIL.Image.Image
        RGB image: a header line with the CT-level decision, then one tile per slice.

    Raises
    ------
    ValueError
        If ``hu`` does not match the mask's shape.
    """
    if hu.shape != result.hemorrhage_mask.shape:
        raise ValueError(
            f"hu shape {hu.shape} does not match the result's mask {result.hemorrhage_mask.shape}"
        )
    indices = select_preview_slices(result, max_slices)
    spec = result.series.spec
    low = spec.window_level_hu - spec.window_width_hu / 2.0
    rows, columns = hu.shape[1:]
    scale = tile_px / max(rows, columns)
    tile_size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    font = ImageFont.load_default(size=13)
    header_font = ImageFont.load_default(size=15)
    width = tile_size[0] * len(indices)
    canvas = Image.new("RGB", (width, _HEADER_PX + _TITLE_PX + tile_size[1]), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    decision = "PRESENT" if result.ct_positive else "ABSENT"
    draw.text(
        (4, 3),
        f"Hemorrhage {decision} (certainty {result.certainty:.2f}) - {result.model.name} "
        f"{result.model.version} - NOT FOR DIAGNOSIS",
        fill=(255, 255, 0),
        font=header_font,
    )
    n = len(result.slice_probabilities)
    for column, index in enumerate(indices):
        grey = np.clip((hu[index] - low) / spec.window_width_hu, 0.0, 1.0) * 255.0
        rgb = np.repeat(grey[..., None], 3, axis=2)
        mask = result.hemorrhage_mask[index]
        rgb[mask] = (1 - _OVERLAY_ALPHA) * rgb[mask] + _OVERLAY_ALPHA * _OVERLAY_RGB
        tile = Image.fromarray(rgb.astype(np.uint8), "RGB").resize(
            tile_size, Image.Resampling.BILINEAR
        )
        x = column * tile_size[0]
        canvas.paste(tile, (x, _HEADER_PX + _TITLE_PX))
        probability = float(result.slice_probabilities[index])
        flag = " +" if probability >= result.threshold else ""
        draw.text(
            (x + 4, _HEADER_PX + 2),
            f"slice {index + 1}/{n}  p={probability:.2f}{flag}",
            fill=(255, 255, 255),
            font=font,
        )
    return canvas


def preview_png(
    result: SeriesResult, hu: np.ndarray, *, max_slices: int = 4, tile_px: int = 256
) -> bytes:
    """:func:`render_preview` encoded as PNG bytes.

    Raises
    ------
    ValueError
        As :func:`render_preview`.
    """
    buffer = io.BytesIO()
    render_preview(result, hu, max_slices=max_slices, tile_px=tile_px).save(buffer, format="PNG")
    return buffer.getvalue()
