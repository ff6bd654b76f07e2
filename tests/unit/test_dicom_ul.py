"""The node's Upper Layer pieces: the header scan against pydicom's reading of the same bytes, the
command codec against pydicom, PDV splitting, and A-ASSOCIATE negotiation with pynetdicom's PDUs."""

from __future__ import annotations

import socket
import struct
from io import BytesIO

import pytest
from association_pdus import associate_rq_pdu
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_CANCEL_RQ
from pynetdicom.dimse_primitives import C_CANCEL
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.presentation import build_context

from radnet_node import dicom_ul

_UIDS = {
    "SOPInstanceUID": "1.2.3.4.5.6",
    "StudyInstanceUID": "1.2.3.4",
    "SeriesInstanceUID": "1.2.3.4.5",
}


def _dataset(*, undefined_sequence: bool) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.SeriesDescription = "Schädel axial"
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.3.9"
    inner = Dataset()
    inner.CodeValue = "X"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item])  # (0008,1140): before the UIDs
    for sequence in (ds.ReferencedImageSequence, item.PurposeOfReferenceCodeSequence):
        sequence.is_undefined_length = undefined_sequence
        for entry in sequence:
            entry.is_undefined_length_sequence_item = undefined_sequence
    for keyword, value in _UIDS.items():
        setattr(ds, keyword, value)
    ds.SeriesNumber = 7
    ds.Rows = 2  # past the last wanted element: the scan stops before it
    return ds


def _bytes(ds: Dataset, implicit: bool) -> bytes:
    """``ds`` encoded little endian, implicit or explicit VR, as a peer sends it."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("undefined", [True, False])
def test_the_scan_finds_what_pydicom_reads(implicit: bool, undefined: bool) -> None:
    raw = _bytes(_dataset(undefined_sequence=undefined), implicit)
    assert (b"\xff\xff\xff\xff" in raw) == undefined
    found = dicom_ul.scan_header(memoryview(raw), implicit=implicit).values
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    read = dcmread(BytesIO(raw), force=True)
    read.file_meta = Dataset()
    read.file_meta.TransferSyntaxUID = syntax
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
        assert found[keyword].rstrip(b"\x00 ").decode() == str(read[keyword].value)
    assert found["SeriesNumber"].strip() == b"7"
    assert found["SeriesDescription"].decode("latin-1").strip() == "Schädel axial"
    # a prefix that ends before the last wanted element asks for more; the whole is enough
    cut = raw.index(b"1.2.3.4.5\x00") - 4
    with pytest.raises(dicom_ul.NeedMoreData):
        dicom_ul.scan_header(memoryview(raw[:cut]), implicit=implicit)
    with pytest.raises(dicom_ul.ProtocolError):
        dicom_ul.scan_header(memoryview(raw[:cut]), implicit=implicit, complete=True)


def test_a_dataset_shorter_than_the_scan_is_whole_when_complete() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    raw = _bytes(ds, True)
    with pytest.raises(dicom_ul.NeedMoreData):
        dicom_ul.scan_header(memoryview(raw), implicit=True)
    found = dicom_ul.scan_header(memoryview(raw), implicit=True, complete=True).values
    assert found == {"SOPInstanceUID": b"1.2.3\x00"}


def test_bytes_that_are_not_an_explicit_dataset_are_a_protocol_error() -> None:
    with pytest.raises(dicom_ul.ProtocolError, match="no valid VR"):
        dicom_ul.scan_header(memoryview(b"\x08\x00\x18\x00\x01\x02\x03\x04" * 4), implicit=False)


def test_commands_decode_and_responses_read_back_with_pydicom() -> None:
    request = Dataset()
    request.AffectedSOPClassUID = CTImageStorage
    request.CommandField = 0x0001
    request.MessageID = 42
    request.Priority = 0
    request.CommandDataSetType = 0x0000
    request.AffectedSOPInstanceUID = "1.2.3.4.5"
    command = dicom_ul.Command.decode(_bytes(request, True))
    assert command.command_field == dicom_ul.C_STORE_RQ
    assert command.message_id == 42
    assert command.has_dataset
    assert command.affected_sop_instance_uid == "1.2.3.4.5"
    response = dcmread(BytesIO(dicom_ul.command_response(command, 0xA700)), force=True)
    response.file_meta = Dataset()
    response.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert response.CommandField == 0x8001
    assert response.MessageIDBeingRespondedTo == 42
    assert response.Status == 0xA700
    assert response.CommandDataSetType == 0x0101
    assert response.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert response.AffectedSOPClassUID == CTImageStorage
    assert response.CommandGroupLength == len(dicom_ul.command_response(command, 0)) - 12


def test_a_command_without_its_required_elements_is_a_protocol_error() -> None:
    with pytest.raises(dicom_ul.ProtocolError, match="lacks"):
        dicom_ul.Command.decode(struct.pack("<HHI", 0, 0x0110, 2) + b"\x01\x00")
    with pytest.raises(dicom_ul.ProtocolError, match="malformed"):
        dicom_ul.Command.decode(struct.pack("<HHI", 8, 0x0018, 2) + b"12")


def test_a_c_cancel_rq_decodes_without_a_message_id_of_its_own() -> None:
    # as pynetdicom encodes it (PS3.7 9.3.2.3): MessageIDBeingRespondedTo, no MessageID
    primitive = C_CANCEL()
    primitive.MessageIDBeingRespondedTo = 7
    message = C_CANCEL_RQ()
    message.primitive_to_message(primitive)
    assert "MessageID" not in message.command_set
    command = dicom_ul.Command.decode(encode(message.command_set, True, True))
    assert command.command_field == dicom_ul.C_CANCEL_RQ
    assert command.message_id == 7
    assert not command.has_dataset
    assert command.name == "C-CANCEL-RQ"
    # any other request still needs its MessageID
    without = struct.pack("<HHI", 0, 0x0100, 2) + b"\x20\x00"
    without += struct.pack("<HHI", 0, 0x0120, 2) + b"\x07\x00"
    without += struct.pack("<HHI", 0, 0x0800, 2) + b"\x01\x01"
    with pytest.raises(dicom_ul.ProtocolError, match=r"lacks \(0000,0110\)"):
        dicom_ul.Command.decode(without)


def test_command_fields_by_name() -> None:
    assert dicom_ul.command_name(0x0020) == "C-FIND-RQ"
    assert dicom_ul.command_name(0x8001) == "C-STORE-RSP"
    assert dicom_ul.command_name(0x0110) == "N-GET-RQ"
    assert dicom_ul.command_name(0x0042) == "command 0x0042"


@pytest.mark.parametrize(
    ("sent", "mid_pdu"),
    [(b"", False), (b"\x04\x00", True), (b"\x07\x00\x00\x00\x00\x04\x00", True)],
)
def test_a_connection_closed_between_or_inside_pdus(sent: bytes, mid_pdu: bool) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(sent)
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(dicom_ul.ConnectionClosed) as closed:
            dicom_ul.PduReader(ours, 1 << 20).read()
    assert closed.value.mid_pdu == mid_pdu
    assert isinstance(closed.value, EOFError)


def test_pdvs_split_a_p_data_body_and_refuse_a_bad_length() -> None:
    body = struct.pack(">IBB", 5, 1, 0x03) + b"abc" + struct.pack(">IBB", 3, 3, 0x00) + b"d"
    items = [(c, m, bytes(f)) for c, m, f in dicom_ul.pdvs(memoryview(body))]
    assert items == [(1, 0x03, b"abc"), (3, 0x00, b"d")]
    with pytest.raises(dicom_ul.ProtocolError):
        list(dicom_ul.pdvs(memoryview(struct.pack(">IBB", 99, 1, 0) + b"x")))


def test_negotiation_accepts_what_is_supported_and_refuses_the_rest() -> None:
    request = associate_rq_pdu([CTImageStorage, "1.2.840.10008.5.1.4.1.1.4"])  # CT, MR
    supported = [build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    negotiated = dicom_ul.negotiate(request, supported, max_pdu=131072)
    assert negotiated.calling_ae_title == "MODALITY"
    assert negotiated.called_ae_title == "RADNET"
    assert negotiated.accepted == {1: (CTImageStorage, ImplicitVRLittleEndian)}
    assert negotiated.refused == ["1.2.840.10008.5.1.4.1.1.4"]
    assert negotiated.peer_max_pdu == 16384
    accept = A_ASSOCIATE_AC()
    accept.decode(negotiated.accept_pdu)
    answer = accept.to_primitive()
    assert answer.maximum_length_received == 131072
    with pytest.raises(dicom_ul.ProtocolError, match="A-ASSOCIATE-RQ"):
        dicom_ul.negotiate(b"\x01\x00\x00\x00\x00\x02\x00\x01", supported, max_pdu=0)
