"""Expert annotations and clinical variables (RICORD-style), imported into the node.

Sites keep labels and clinical data in spreadsheets keyed by what they know: the
original accession number or MRN. The importers here join those keys to the
de-identified studies through audited reads of the originals vault, de-identify
the values with the same map (dates shifted by the patient's shift, identifiers
and free text dropped) and store them against the pseudonymous study — all of a
file or none of it. Segmentation masks become DICOM SEG objects that reference
only de-identified instances.

* ``schema`` — the vocabularies, clinical variables and segment codes, as data.
* ``values`` — parsing and normalising one cell against the schema.
* ``csvfile`` — reading a spreadsheet export (encoding, delimiter, headers).
* ``lookup`` — the audited vault reads that join original keys to studies.
* ``report`` — what an import did and could not use.
* ``importer`` — label and clinical-variable imports.
* ``seg`` — segmentation masks to DICOM SEG.
"""
