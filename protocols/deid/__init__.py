"""The de-identification profile both sides of the federation apply.

* ``table`` — PS3.15 Table E.1-1 as generated data (``table_e1_1.json``, made by
  ``tools/gen_deid_profile.py``); ``dictionary`` — the data dictionary (VRs, keywords,
  standard UIDs), generated the same way.
* ``keep_list`` — the reviewed attributes outside the table that are kept.
* ``options`` — the profile options a site chooses, and their CID 7050 codes.
* ``safe_private`` — the allowlist of private attributes kept under Retain Safe Private.
* ``profile`` — compiles table + options + keep-list into one action per attribute.
"""
