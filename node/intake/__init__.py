"""Intake: folders (``ingest``) and the DICOM listener (``listener``) take the same path.

Each instance is de-identified into the node store, then recorded in the index;
what cannot be taken in is quarantined with its reason.
"""
