"""Helpers for the node's tests: tiny weights, tiny generated series, settings in a temporary data
folder, a real pynetdicom Storage SCP as a destination, a C-STORE sender, and waiting on a condition
with a deadline (never a fixed sleep)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fixed_weights import POSITIVE_BIAS, write_fixed_weights
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from radnet_node.catalog import InstanceInfo
from radnet_node.config import Settings
from training.dicom_writer import SeriesGeometry, StudyInfo, write_ct_series

SPACING = (4.0, 4.0)


def tiny_weights(directory: Path, slice_bias: float = POSITIVE_BIAS) -> Path:
    """Tiny RADnet weights whose every slice scores sigmoid(slice_bias) (0.993: positive)."""
    return write_fixed_weights(
        directory / "tiny.pt", slice_bias=slice_bias, field_of_view_mm=256.0,
        name="radnet-tiny-test",
    )  # fmt: skip


def head_volume(slices: int, size: int = 64) -> np.ndarray:
    """An elliptic head (skull around brain) in air, in HU, with a bright blob."""
    y = (np.arange(size)[:, None] - size / 2) * SPACING[0]
    x = (np.arange(size)[None, :] - size / 2) * SPACING[1]
    outer = (y / 100.0) ** 2 + (x / 85.0) ** 2 <= 1.0
    inner = (y / 94.0) ** 2 + (x / 79.0) ** 2 <= 1.0
    plane = np.full((size, size), -1000.0)
    plane[outer] = 1000.0
    plane[inner] = 30.0
    volume = np.repeat(plane[None], slices, axis=0)
    volume[:, 28:34, 28:34] = 70.0
    return volume


def write_series(
    directory: Path,
    name: str,
    *,
    slices: int = 6,
    series_number: int = 2,
    study: StudyInfo | None = None,
    **kwargs: Any,
) -> list[Path]:
    """A tiny axial head CT series (64 x 64, 5 mm) in ``directory/name``."""
    geometry = SeriesGeometry(
        rows=64,
        columns=64,
        pixel_spacing_mm=SPACING,
        table_positions_mm=tuple(5.0 * i for i in range(slices)),
    )
    study = study or StudyInfo(uid_seed=f"radnet-node-test-{name}", accession_number="ACC" + name)
    return write_ct_series(
        head_volume(slices), geometry, directory / name, study, series_number=series_number,
        **kwargs,
    )  # fmt: skip


def instance_info(path: Path) -> InstanceInfo:
    """What ingest records of a received file, read from the file's header as the node would."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceInfo(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        size_bytes=path.stat().st_size,
        spool_path=str(path),
        accession_number=str(ds.get("AccessionNumber", "")),
        modality=str(ds.get("Modality", "")),
        series_number=int(ds.SeriesNumber) if ds.get("SeriesNumber") is not None else None,
        series_description=str(ds.get("SeriesDescription", "")),
    )


def node_settings(data_dir: Path, weights: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for a node on 127.0.0.1, a free port, ``data_dir``, tiny weights on the CPU; each
    keyword is a section merged over these defaults (``destinations=[...]`` a list)."""
    document: dict[str, Any] = {
        "node": {"host": "127.0.0.1", "port": 0, "data_dir": str(data_dir), "min_free_disk_mb": 0,
                 "shutdown_grace_seconds": 30.0},
        "series": {"quiet_seconds": 1.0},
        "model": {"weights": str(weights), "device": "cpu", "threads": 1, "precision": "fp32"},
        "logging": {"level": "warning"},
    }  # fmt: skip
    for key, value in sections.items():
        if isinstance(value, dict):
            document[key] = {**document.get(key, {}), **value}
        else:
            document[key] = value
    return Settings.model_validate(document).relative_to(data_dir)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the
    deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def send(
    port: int,
    files: Sequence[Path | Dataset],
    *,
    called: str = "RADNET",
    calling: str = "MODALITY",
    bind_address: tuple[str, int] | None = None,
    host: str = "127.0.0.1",
) -> list[int]:
    """C-STORE ``files`` on one association; returns each status.

    Raises
    ------
    ConnectionRefusedError
        The association was not established (rejected, aborted or no connection).
    """
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    datasets = [f if isinstance(f, Dataset) else pydicom.dcmread(f) for f in files]
    for pair in sorted(
        {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}
    ):
        ae.add_requested_context(pair[0], pair[1])
    assoc = ae.associate(host, port, ae_title=called, bind_address=bind_address)
    if not assoc.is_established:
        raise ConnectionRefusedError(
            f"association not established (rejected {assoc.is_rejected}, aborted "
            f"{assoc.is_aborted})"
        )
    statuses = []
    try:
        for ds in datasets:
            answer = assoc.send_c_store(ds)
            statuses.append(int(answer.Status) if answer and "Status" in answer else -1)
    finally:
        assoc.release()
    return statuses


def reject_reason(
    port: int,
    *,
    called: str = "RADNET",
    calling: str = "MODALITY",
    bind_address: tuple[str, int] | None = None,
) -> tuple[int, int, int] | None:
    """(result, source, reason) of the A-ASSOCIATE-RJ, or None when the association was accepted
    (it is then released)."""  # fmt: skip
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=bind_address)
    if assoc.is_established:
        assoc.release()
        return None
    assert assoc.is_rejected, "neither accepted nor rejected"
    primitive = assoc.acceptor.primitive
    return (int(primitive.result), int(primitive.result_source), int(primitive.diagnostic))


@dataclass
class Destination:
    """A real pynetdicom Storage SCP on 127.0.0.1 that keeps what it receives in memory.

    ``status`` is what it answers to every C-STORE (a warning or a failure on demand);
    ``excluded``: storage SOP classes it does not accept (refused at negotiation).
    """

    ae_title: str = "PACS"
    status: int = 0x0000
    require_called_aet: bool = False
    excluded: tuple[str, ...] = ()
    received: list[Dataset] = field(default_factory=list)
    port: int = 0
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return self.status

    def start(self, port: int = 0) -> Destination:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = self.require_called_aet
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax not in self.excluded:
                ae.add_supported_context(context.abstract_syntax)
        self._server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def sop_uids(self) -> list[str]:
        with self._lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]

    def modalities(self) -> list[str]:
        with self._lock:
            return sorted(str(ds.Modality) for ds in self.received)
