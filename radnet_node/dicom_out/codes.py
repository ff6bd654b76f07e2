"""The coded concepts of the node's DICOM output (SR, SEG, key image), in one place.

Values and meanings follow /shared/design/DICOM-OUTPUT.md; codes that pydicom's dictionary names
differently (or not at all) are built by hand here.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ABSENT",
    "ARTIFICIAL_INTELLIGENCE",
    "BRAIN",
    "CERTAINTY_OF_FINDING",
    "CT_HEAD",
    "DCM_PROCESSING_EQUIPMENT",
    "DEVICE",
    "HEMORRHAGE",
    "INTRACRANIAL_HEMORRHAGE",
    "MILLILITER",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "PERCENT",
    "PRESENT",
    "PROCESSING_ALGORITHM",
    "VOLUME",
]

# Built by hand: pydicom maps 1386000 to a second keyword ("Occlusion of artery") as well.
INTRACRANIAL_HEMORRHAGE = Code("1386000", "SCT", "Intracranial hemorrhage")
# The DICOM value set for presence (CID 240/241), not SCT 2667000.
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
BRAIN = Code("12738006", "SCT", "Brain")
# 111012, not 111047 (probability of cancer) or 122157.
CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")
VOLUME = Code("118565006", "SCT", "Volume")
PERCENT = Code("%", "UCUM", "Percent")
MILLILITER = Code("ml", "UCUM", "milliliter")
# The imaging procedure the report is about (LOINC long common name), not the algorithm.
CT_HEAD = Code("24725-4", "LN", "CT Head")
DEVICE: Code = codes.DCM.Device
ARTIFICIAL_INTELLIGENCE: Code = codes.DCM.ArtificialIntelligence
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically abnormal structure")
HEMORRHAGE = Code("50960005", "SCT", "Hemorrhage")
# IHE AI Results: purpose of reference of the contributing equipment.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
DCM_PROCESSING_EQUIPMENT: Code = codes.DCM.ProcessingEquipment
