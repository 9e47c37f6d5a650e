"""The PHI scanner both sides run: it does not trust the de-identifier.

``findings`` holds the wire model of a finding; ``scanner`` walks a de-identified
instance (every element at every depth, private elements, file meta, raw bytes)
and reports what should not be there.
"""
