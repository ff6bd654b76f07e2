"""DICOM Upper Layer PDUs and DIMSE command sets made by hand, for the unit and integration tests
that speak the protocol themselves (to break it on purpose, or to hold an association open)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from io import BytesIO

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from radnet_node.dicom_ul import PduReader

#: the Verification SOP Class (C-ECHO)
VERIFICATION = "1.2.840.10008.1.1"


def associate_rq_pdu(abstract_syntaxes: Sequence[str], *, called: str = "RADNET") -> bytes:
    """An A-ASSOCIATE-RQ from MODALITY (maximum PDU 16384) proposing each abstract syntax in
    Implicit VR Little Endian, as context IDs 1, 3, 5, ... (for tests that speak the protocol by
    hand)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = called
    contexts = []
    for index, abstract in enumerate(abstract_syntaxes):
        context = build_context(abstract, [ImplicitVRLittleEndian])
        context.context_id = 2 * index + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return bytes(request.encode())


def raw_association(port: int) -> socket.socket:
    """A TCP connection with an accepted association (Verification and CT Image Storage, context
    IDs 1 and 3), made by hand so that the test can then break the protocol."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(associate_rq_pdu([VERIFICATION, CTImageStorage]))
    assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU: (type, body)."""
    pdu_type, body = PduReader(sock, 1 << 20).read()
    return pdu_type, bytes(body)


def c_store_rq(
    sop_uid: str,
    message_id: int = 1,
    *,
    sop_class: str = CTImageStorage,
    context_id: int = 3,
    data_set_type: int = 0x0000,
) -> bytes:
    """A P-DATA-TF holding a whole C-STORE-RQ command (by default: for CT Image Storage, on
    context 3, a data set follows)."""
    uid = sop_uid.encode() + b"\x00" * (len(sop_uid) % 2)
    command = b"".join(
        struct.pack("<HHI", 0, element, len(value)) + value
        for element, value in (
            (0x0002, even(sop_class.encode())),
            (0x0100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
            (0x0110, struct.pack("<H", message_id)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", data_set_type)),  # 0x0000: a data set follows
            (0x1000, uid),
        )
    )
    return p_data_tf(command, 0x03, context_id)


def even(value: bytes) -> bytes:
    return value + b"\x00" * (len(value) % 2)


def command_pdu(
    field_: int,
    message_id: int,
    *,
    context_id: int = 1,
    sop_class: str = VERIFICATION,
    data_set_follows: bool = False,
) -> bytes:
    """A P-DATA-TF holding a whole command set of ``field_`` (e.g. 0x0020 C-FIND-RQ)."""
    command = b"".join(
        struct.pack("<HHI", 0, element, len(value)) + value
        for element, value in (
            (0x0002, even(sop_class.encode())),
            (0x0100, struct.pack("<H", field_)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0800, struct.pack("<H", 0x0000 if data_set_follows else 0x0101)),
        )
    )
    return p_data_tf(command, 0x03, context_id)


def read_response(sock: socket.socket) -> pydicom.Dataset:
    """The next PDU, which must be a P-DATA-TF holding a response command set."""
    pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x04
    return pydicom.dcmread(BytesIO(body[6:]), force=True)


def release(sock: socket.socket) -> None:
    sock.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ
    assert read_pdu(sock)[0] == 0x06  # A-RELEASE-RP


def p_data_tf(payload: bytes, control: int, context_id: int = 3) -> bytes:
    """A P-DATA-TF with one PDV (context 3: CT Image Storage; 1: Verification)."""
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def encoded(ds: pydicom.Dataset, *, implicit: bool) -> bytes:
    """``ds`` as a data set (no file meta) in Implicit or Explicit VR Little Endian."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    return out.getvalue()
