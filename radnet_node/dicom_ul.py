"""The DICOM Upper Layer pieces of the node's acceptor (PS3.8) and the DIMSE command codec (PS3.7),
for a blocking socket per association.

pynetdicom encodes and decodes the association PDUs and negotiates the presentation contexts
(:func:`pynetdicom.presentation.negotiate_as_acceptor`); this module frames PDUs on the socket,
splits P-DATA into PDVs, reads and writes the small implicit-VR command sets, and finds the few
header elements ingest needs in the first bytes of a dataset without decoding it. pynetdicom's own
association reactors poll their queues with 1 ms sleeps, which capped ingest at a fifth of DCMTK's
speed (``benchmarks/bench_ingest.py``); blocking reads here wait for the peer, not for a timer.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from radnet_node import __version__

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "ASSOCIATE_RQ",
    "PDATA",
    "RELEASE_RQ",
    "ABORT",
    "Command",
    "ConnectionClosed",
    "HeaderScan",
    "Negotiated",
    "NeedMoreData",
    "ProtocolError",
    "abort_pdu",
    "command_name",
    "command_response",
    "negotiate",
    "pdvs",
    "PduReader",
    "file_meta_header",
    "file_meta_parts",
    "pdata_pdu",
    "reject_pdu",
    "release_rp_pdu",
    "scan_header",
]

ASSOCIATE_RQ, PDATA, RELEASE_RQ, ABORT = 0x01, 0x04, 0x05, 0x07
#: the node's Implementation Class UID (a UUID-derived UID, PS3.5 B.2) and Version Name, in the
#: A-ASSOCIATE-AC and in the file meta of every spooled instance
IMPLEMENTATION_CLASS_UID = UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'radnet-node:acceptor').int}")
IMPLEMENTATION_VERSION_NAME = f"RADNET_{__version__}"[:16]
_KNOWN_PDU_TYPES = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07}
APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")

# command field values (PS3.7 E.1)
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
#: the request command fields by name (PS3.7 Table E.1-1 and 10.3); a response is the request's
#: value with bit 0x8000 set
_COMMAND_NAMES = {
    0x0001: "C-STORE",
    0x0010: "C-GET",
    0x0020: "C-FIND",
    0x0021: "C-MOVE",
    0x0030: "C-ECHO",
    0x0100: "N-EVENT-REPORT",
    0x0110: "N-GET",
    0x0120: "N-SET",
    0x0130: "N-ACTION",
    0x0140: "N-CREATE",
    0x0150: "N-DELETE",
    0x0FFF: "C-CANCEL",
}
#: Refused: unrecognized operation (PS3.7 Annex C)
STATUS_UNRECOGNIZED_OPERATION = 0x0211
#: Refused: SOP Class not supported (PS3.7 Annex C): the request's SOP class is not the abstract
#: syntax of the presentation context it came on
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: CommandDataSetType: no dataset follows
NO_DATASET = 0x0101
#: the longest command set taken (a longer one is a protocol error: command sets are a few hundred
#: bytes, and an endless one would only grow memory)
MAX_COMMAND = 1 << 20


class ProtocolError(Exception):
    """The peer broke the Upper Layer or DIMSE protocol; the association is aborted."""


class NeedMoreData(Exception):
    """The header scan ran past the bytes received so far."""


class ConnectionClosed(EOFError):
    """The peer closed the connection; ``mid_pdu``: inside a PDU (some of it had arrived), not
    between two."""

    def __init__(self, *, mid_pdu: bool) -> None:
        super().__init__(
            "the peer closed the connection" + (" in the middle of a PDU" if mid_pdu else "")
        )
        self.mid_pdu = mid_pdu


# ------------------------------------------------------------------------------------------------
# PDU framing


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking, with reads and writes that fail after ``seconds`` without
    progress, enforced by the kernel (SO_RCVTIMEO / SO_SNDTIMEO) on Linux and macOS.

    Python's own socket timeout polls before every call: one more system call per read on the
    data path. A call that runs out raises BlockingIOError; ``PduReader`` turns a read's into
    TimeoutError. A TLS socket keeps Python's timeout (raising TimeoutError): its reads retry
    inside the ssl module when the kernel's timeout runs out, so they would never end.
    Elsewhere (Windows takes milliseconds in another type) Python's timeout is used too.
    """
    if isinstance(sock, ssl.SSLSocket) or sys.platform not in ("linux", "darwin"):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


#: what a socket call raises when the kernel's timeout (set_kernel_timeouts) runs out
KERNEL_TIMEOUTS = (BlockingIOError,)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    # no MSG_WAITALL: with it the kernel's timeout (SO_RCVTIMEO) bounds a whole call, so a peer
    # silent in the middle of a PDU would be aborted after up to twice the timeout
    received = 0
    total = len(view)
    while received < total:
        try:
            count = sock.recv_into(view[received:])
        except KERNEL_TIMEOUTS as exc:
            raise TimeoutError("nothing received within the network timeout") from exc
        if count == 0:
            raise ConnectionClosed(mid_pdu=received > 0)
        received += count


class PduReader:
    """Reads whole PDUs from a blocking socket into one buffer it reuses (grown on demand up to
    ``limit`` bytes; a larger PDU is a protocol error, not an allocation)."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self._header = bytearray(6)
        self._buffer = bytearray(max(65536, min(limit, 1 << 20)))

    def read(self) -> tuple[int, memoryview]:
        """The next PDU: (type, its body). The body stays valid until the next call.

        Raises
        ------
        ConnectionClosed
            The peer closed the connection (between two PDUs, or ``mid_pdu``).
        ProtocolError
            An unknown PDU type or a length over the limit.
        OSError
            The socket failed or timed out.
        """
        _recv_exact(self.sock, memoryview(self._header))
        pdu_type = self._header[0]
        (length,) = struct.unpack_from(">I", self._header, 2)
        if pdu_type not in _KNOWN_PDU_TYPES:
            raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}")
        if length > self.limit:
            raise ProtocolError(f"PDU of {length} bytes is over the limit of {self.limit}")
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        try:  # (costs nothing unless it raises)
            _recv_exact(self.sock, body)
        except ConnectionClosed:
            raise ConnectionClosed(mid_pdu=True) from None  # the header had arrived
        return pdu_type, body

    @property
    def buffer(self) -> bytearray:
        """The buffer PDUs are read into (lent to the C receive loop, which reads into it too)."""
        return self._buffer

    @property
    def header(self) -> bytes:
        """The 6-byte header of the last PDU read."""
        return bytes(self._header)


def pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """The PDV items of a P-DATA-TF body: (presentation context ID, message control header,
    fragment).

    Raises
    ------
    ProtocolError
        An item runs past the PDU or is shorter than its header.
    """
    position = 0
    end = len(body)
    while position < end:
        if end - position < 6:
            raise ProtocolError("truncated PDV item in a P-DATA-TF")
        length, context_id, control = struct.unpack_from(">IBB", body, position)
        if length < 2 or position + 4 + length > end:
            raise ProtocolError(f"PDV item length {length} does not fit its P-DATA-TF")
        yield context_id, control, body[position + 6 : position + 4 + length]
        position += 4 + length


def pdata_pdu(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF holding a whole command set (last fragment)."""
    item = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", PDATA, 0, len(item)) + item


def abort_pdu(source: int = 0x02, reason: int = 0x00) -> bytes:
    """An A-ABORT PDU (default: service provider, reason not specified)."""
    pdu = A_ABORT_RQ()
    pdu.source = source
    pdu.reason_diagnostic = reason
    return pdu.encode()


def release_rp_pdu() -> bytes:
    """The A-RELEASE-RP PDU."""
    return A_RELEASE_RP().encode()


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU."""
    primitive = A_ASSOCIATE()
    primitive.result = result
    primitive.result_source = source
    primitive.diagnostic = reason
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


# ------------------------------------------------------------------------------------------------
# association negotiation


@dataclass
class Negotiated:
    """An A-ASSOCIATE-RQ and the answer to it, should it be accepted."""

    calling_ae_title: str
    called_ae_title: str
    #: accepted presentation contexts: ID -> (abstract syntax, transfer syntax)
    accepted: dict[int, tuple[UID, UID]] = field(default_factory=dict)
    #: abstract syntaxes of the contexts refused
    refused: list[UID] = field(default_factory=list)
    #: the largest P-DATA-TF the peer takes (0: no limit)
    peer_max_pdu: int = 0
    #: the A-ASSOCIATE-AC PDU
    accept_pdu: bytes = b""


def negotiate(
    request: bytes,
    supported: Sequence[PresentationContext],
    *,
    max_pdu: int,
) -> Negotiated:
    """Decode an A-ASSOCIATE-RQ (header and body) and prepare the A-ASSOCIATE-AC: presentation
    contexts negotiated by pynetdicom (the transfer syntax: the first of ``supported``'s own list
    that the context proposes), SCP/SCU role selection answered for the contexts whose roles
    ``supported`` sets (none returned where they are None: default roles), an asynchronous
    operations window answered with (1, 1), user identity accepted without a server response,
    extended negotiation not supported (no item returned).

    Raises
    ------
    ProtocolError
        The PDU cannot be decoded.
    """
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(request)
        primitive = pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - pynetdicom reports a bad PDU in many types
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__}: {exc})") from None
    calling = str(primitive.calling_ae_title or "").strip()
    called = str(primitive.called_ae_title or "").strip()
    roles: dict[UID, tuple[bool | None, bool | None]] = {}
    peer_max = 0
    async_requested = False
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[UID(item.sop_class_uid)] = (item.scu_role, item.scp_role)
        elif isinstance(item, AsynchronousOperationsWindowNegotiation):
            async_requested = True
    result, role_items = negotiate_as_acceptor(
        primitive.presentation_context_definition_list, list(supported), roles
    )
    negotiated = Negotiated(calling_ae_title=calling, called_ae_title=called, peer_max_pdu=peer_max)
    for context in result:
        if context.result == 0x00 and context.context_id is not None:
            negotiated.accepted[int(context.context_id)] = (
                UID(str(context.abstract_syntax)),
                UID(str(context.transfer_syntax[0])),
            )
        elif context.abstract_syntax is not None:
            negotiated.refused.append(UID(str(context.abstract_syntax)))

    answer = A_ASSOCIATE()
    answer.application_context_name = APPLICATION_CONTEXT
    answer.calling_ae_title = primitive.calling_ae_title
    answer.called_ae_title = primitive.called_ae_title
    answer.result = 0x00
    answer.result_source = 0x01
    answer.presentation_context_definition_results_list = result
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    user_information: list[object] = [maximum, implementation, version, *role_items]
    if async_requested:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        user_information.append(window)
    answer.user_information = user_information  # type: ignore[assignment]
    accept = A_ASSOCIATE_AC()
    accept.from_primitive(answer)
    negotiated.accept_pdu = accept.encode()
    return negotiated


# ------------------------------------------------------------------------------------------------
# DIMSE command sets (always implicit VR little endian, group 0000)


@dataclass(frozen=True)
class Command:
    """A received command set: its elements as raw values, by element number of group 0000."""

    elements: dict[int, bytes]

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Command:
        """Parse a command set.

        Raises
        ------
        ProtocolError
            An element runs past the end, a tag is not in group 0000, or a required element
            is missing: the Command Field, the Command Data Set Type and the Message ID (for a
            C-CANCEL-RQ: the Message ID Being Responded To, the request it cancels).
        """
        elements: dict[int, bytes] = {}
        position = 0
        end = len(data)
        while position < end:
            if end - position < 8:
                raise ProtocolError("truncated command set")
            group, element, length = struct.unpack_from("<HHI", data, position)
            position += 8
            if group != 0x0000 or position + length > end:
                raise ProtocolError(f"malformed command element ({group:04X},{element:04X})")
            elements[element] = bytes(data[position : position + length])
            position += length
        for required in (0x0100, 0x0800):
            if len(elements.get(required, b"")) < 2:
                raise ProtocolError(f"command set lacks (0000,{required:04X})")
        # a C-CANCEL-RQ has no Message ID of its own (PS3.7 9.3.2.3): it names the request it
        # cancels in (0000,0120)
        cancel = struct.unpack_from("<H", elements[0x0100])[0] == C_CANCEL_RQ
        identifier = 0x0120 if cancel else 0x0110
        if len(elements.get(identifier, b"")) < 2:
            raise ProtocolError(f"command set lacks (0000,{identifier:04X})")
        return cls(elements)

    def _us(self, element: int) -> int:
        return int(struct.unpack_from("<H", self.elements[element])[0])

    @property
    def command_field(self) -> int:
        return self._us(0x0100)

    @property
    def message_id(self) -> int:
        """The Message ID (for a C-CANCEL-RQ: the Message ID Being Responded To)."""
        return self._us(0x0120 if self.command_field == C_CANCEL_RQ else 0x0110)

    @property
    def name(self) -> str:
        """The command field by name, e.g. ``C-FIND-RQ``."""
        return command_name(self.command_field)

    @property
    def has_dataset(self) -> bool:
        return self._us(0x0800) != NO_DATASET

    def uid(self, element: int) -> str:
        """A UID element as text ('' when absent)."""
        return self.elements.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    @property
    def affected_sop_class_uid(self) -> str:
        return self.uid(0x0002)

    @property
    def affected_sop_instance_uid(self) -> str:
        return self.uid(0x1000)


def command_name(command_field: int) -> str:
    """A command field by name (``C-FIND-RQ``, ``C-STORE-RSP``); an unknown one in hex."""
    name = _COMMAND_NAMES.get(command_field & 0x7FFF)
    if name is None:
        return f"command 0x{command_field:04X}"
    return f"{name}-{'RSP' if command_field & 0x8000 else 'RQ'}"


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    # a request's UID is echoed as it came; one that is not ASCII (refused) gets "?" for those
    raw = uid.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def command_response(request: Command, status: int, *, sop_class_uid: str = "") -> bytes:
    """The response command set to ``request`` with ``status`` (C-STORE-RSP, C-ECHO-RSP, or the
    response of whatever was asked, refused)."""
    body = b""
    sop_class = request.affected_sop_class_uid or sop_class_uid
    if sop_class:
        body += _element(0x0002, _uid_value(sop_class))
    body += _element(0x0100, struct.pack("<H", request.command_field | 0x8000))
    body += _element(0x0120, struct.pack("<H", request.message_id))
    body += _element(0x0800, struct.pack("<H", NO_DATASET))
    body += _element(0x0900, struct.pack("<H", status))
    if request.affected_sop_instance_uid:
        body += _element(0x1000, _uid_value(request.affected_sop_instance_uid))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def file_meta_header(sop_class: str, sop_instance: str, syntax: str, source_ae: str) -> bytes:
    """Preamble, 'DICM' and the file meta information (PS3.10 7.1) that make a received dataset
    a DICOM file, with this node as the implementation and ``source_ae`` (the calling AE title)
    as the Source Application Entity Title when given."""
    before, after = file_meta_parts(sop_class, syntax, source_ae)
    body = before + _meta_element(0x0003, b"UI", _uid_value(sop_instance)) + after
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + length + body


def file_meta_parts(sop_class: str, syntax: str, source_ae: str) -> tuple[bytes, bytes]:
    """The file meta elements before and after (0002,0003) Media Storage SOP Instance UID: the
    same for every instance of one presentation context of one association (the C receive loop
    puts the group length, the instance's UID and these together)."""
    before = _meta_element(0x0001, b"OB", b"\x00\x01") + _meta_element(
        0x0002, b"UI", _uid_value(sop_class)
    )
    after = [
        _meta_element(0x0010, b"UI", _uid_value(str(syntax))),
        _meta_element(0x0012, b"UI", _uid_value(IMPLEMENTATION_CLASS_UID)),
        _meta_element(0x0013, b"SH", _text_value(IMPLEMENTATION_VERSION_NAME)),
    ]
    if source_ae:
        after.append(_meta_element(0x0016, b"AE", _text_value(source_ae)))
    return before, b"".join(after)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 element, explicit VR little endian."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _text_value(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


# ------------------------------------------------------------------------------------------------
# the header elements ingest needs, found in a dataset's first bytes without decoding it

#: (0008,0005), (0008,0016), (0008,0018), (0008,0050), (0008,0060), (0008,103E), (0020,000D),
#: (0020,000E), (0020,0011): what the catalog records; the scan stops past the last of them
_WANTED = {
    0x00080005: "SpecificCharacterSet",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080050: "AccessionNumber",
    0x00080060: "Modality",
    0x0008103E: "SeriesDescription",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
}
_LAST_WANTED = 0x00200011
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_LONG_LENGTH = struct.Struct("<I")
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


@dataclass(frozen=True)
class HeaderScan:
    """The raw values of the wanted elements (absent ones missing)."""

    values: dict[str, bytes]


def _tag_at(data: memoryview, position: int) -> int:
    if position + 4 > len(data):
        raise NeedMoreData
    group, element = struct.unpack_from("<HH", data, position)
    return int((group << 16) | element)


def _element_at(data: memoryview, position: int, implicit: bool) -> tuple[int, int, int, bool]:
    """(tag, value offset, value length, is a sequence) of the element at ``position``."""
    tag = _tag_at(data, position)
    if implicit or (tag >> 16) == 0xFFFE:
        if position + 8 > len(data):
            raise NeedMoreData
        (length,) = struct.unpack_from("<I", data, position + 4)
        return tag, position + 8, length, length == _UNDEFINED
    if position + 8 > len(data):
        raise NeedMoreData
    vr = bytes(data[position + 4 : position + 6])
    if vr in _LONG_VRS:
        if position + 12 > len(data):
            raise NeedMoreData
        (length,) = struct.unpack_from("<I", data, position + 8)
        return tag, position + 12, length, vr in (b"SQ", b"UN") and length == _UNDEFINED
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise ProtocolError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no valid VR")
    (length,) = struct.unpack_from("<H", data, position + 6)
    return tag, position + 8, length, False


def _skip_sequence(data: memoryview, position: int, implicit: bool, depth: int) -> int:
    """Skip an undefined-length sequence's items; returns the offset after its delimiter."""
    if depth > 16:
        raise ProtocolError("sequences nested more than 16 deep")
    while True:
        tag = _tag_at(data, position)
        if position + 8 > len(data):
            raise NeedMoreData
        (length,) = struct.unpack_from("<I", data, position + 4)
        position += 8
        if tag == _SEQUENCE_END:
            return position
        if tag != _ITEM:
            raise ProtocolError(f"unexpected tag {tag:08X} in a sequence")
        if length != _UNDEFINED:
            position += length
            continue
        while True:  # the item's elements until its delimiter
            tag, offset, length, nested = _element_at(data, position, implicit)
            if tag == _ITEM_END:
                position = offset
                break
            position = (
                _skip_sequence(data, offset, implicit, depth + 1) if nested else offset + length
            )


def scan_header(data: memoryview, *, implicit: bool, complete: bool = False) -> HeaderScan:
    """Find the wanted elements in the first bytes of a little-endian dataset: walks the
    top-level elements by their lengths (values are not decoded) and stops past
    (0020,0011). Sequences of undefined length are skipped item by item.

    ``complete``: ``data`` is the whole dataset (running off its end is then an error).

    Raises
    ------
    NeedMoreData
        The wanted elements are not all within ``data`` (scan again with more of the dataset).
    ProtocolError
        The bytes are not a dataset in that encoding (or, ``complete``, a truncated one).
    """
    try:
        return _scan(data, implicit, complete)
    except NeedMoreData:
        if complete:
            raise ProtocolError("the dataset ends inside an element") from None
        raise


_EXPLICIT_HEADER = struct.Struct("<HH2sH")  # group, element, VR, short length
_IMPLICIT_HEADER = struct.Struct("<HHI")  # group, element, length


def _scan(data: memoryview, implicit: bool, complete: bool) -> HeaderScan:
    # the element headers are read inline (one unpack each): this runs for every instance
    values: dict[str, bytes] = {}
    position = 0
    end = len(data)
    while position + 8 <= end:
        if implicit:
            group, element, length = _IMPLICIT_HEADER.unpack_from(data, position)
            offset, sequence = position + 8, length == _UNDEFINED
        else:
            group, element, vr, length = _EXPLICIT_HEADER.unpack_from(data, position)
            offset, sequence = position + 8, False
            if group == 0xFFFE:  # an item or delimiter (no VR): invalid here, reported below
                _, offset, length, sequence = _element_at(data, position, implicit)
            elif vr in _LONG_VRS:
                if position + 12 > end:
                    raise NeedMoreData
                (length,) = _LONG_LENGTH.unpack_from(data, position + 8)
                offset = position + 12
                sequence = vr in (b"SQ", b"UN") and length == _UNDEFINED
            elif not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise ProtocolError(f"element ({group:04X},{element:04X}) has no valid VR")
        tag = (group << 16) | element
        if tag > _LAST_WANTED:
            return HeaderScan(values)
        if sequence:
            position = _skip_sequence(data, offset, implicit, 0)
            continue
        if length == _UNDEFINED:
            raise ProtocolError(f"element {tag:08X} of undefined length is not a sequence")
        name = _WANTED.get(tag)
        if name is not None:
            if offset + length > end:
                raise NeedMoreData
            values[name] = bytes(data[offset : offset + length])
        position = offset + length
    if position < end:  # an element header cut off
        raise NeedMoreData
    if complete:
        return HeaderScan(values)
    raise NeedMoreData
