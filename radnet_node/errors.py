"""The one error hierarchy of radnet-node.

Every error names what it is about (a file, a series, a config key) and what is wrong; the CLI turns
them into one clear line and an exit code, the ingest layer into a DIMSE status.
"""

from __future__ import annotations


class RadnetError(Exception):
    """Base class of every error radnet-node raises on purpose."""


class ConfigError(RadnetError):
    """The configuration file or a value in it is invalid."""


class InputError(RadnetError):
    """One input file cannot be used (unreadable, not DICOM, undecodable pixel data)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SeriesError(RadnetError):
    """A series cannot be processed; names the series and the reason."""

    def __init__(self, series: str, reason: str) -> None:
        self.series = series
        self.reason = reason
        super().__init__(f"series {series}: {reason}")


class UnsupportedImageError(SeriesError):
    """The series is not a greyscale CT image series (RGB, secondary capture, other modality)."""


class NoPixelDataError(SeriesError):
    """An instance of the series carries no pixel data."""


class DecodeError(SeriesError):
    """Pixel data could not be decoded (corrupt stream or missing decoder plugin)."""


class InconsistentGeometryError(SeriesError):
    """Mixed orientations, sizes or spacings, or positions that do not form one stack."""


class DuplicatePositionError(InconsistentGeometryError):
    """Two slices of the series share one position along the slice normal."""


class TooFewSlicesError(SeriesError):
    """The series has fewer slices than the configured minimum."""


class WeightsError(RadnetError):
    """A weights file or its model card is missing, corrupt, or does not match the model."""


class DatasetError(RadnetError):
    """A training or evaluation dataset (or one case in it) is malformed."""
