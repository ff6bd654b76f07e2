"""A-ASSOCIATE-RQ PDUs made by hand, for the unit and integration tests that speak the DICOM
Upper Layer protocol themselves (to break it on purpose, or to hold an association open)."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context


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
