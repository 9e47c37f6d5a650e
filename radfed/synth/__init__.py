"""Synthetic DICOM for the demo, the benchmarks and the tests — never real patient data.

* ``site`` — a hospital's worth of PHI-laden chest CT, CR/DX, ultrasound and SR studies.
* ``canary`` — the PHI-canary corpus: unique canary strings planted in every
  Table E.1-1 attribute pydicom can express, in nested sequences, private
  elements, file meta, padding, overlays and UN elements.
"""
