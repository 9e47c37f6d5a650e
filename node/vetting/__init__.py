"""Vetting: the PHI scanner run on the node, burned-in text (OCR, masking), policy and review."""
