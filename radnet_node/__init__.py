"""radnet-node: RADnet intracranial hemorrhage detection on head CT, as a DICOM node.

Research and integration-testing software; not a medical device.
"""

__version__ = "0.1.0"
