"""The de-identification profile both sides of the federation apply.

* ``_table_e1_1`` — PS3.15 Table E.1-1 as generated data (``tools/gen_deid_profile.py``).
* ``keep_list`` — the reviewed attributes outside the table that are kept.
* ``options`` — the profile options a site chooses, and their CID 7050 codes.
* ``safe_private`` — the allowlist of private attributes kept under Retain Safe Private.
* ``profile`` — compiles table + options + keep-list into one action per attribute.
"""
