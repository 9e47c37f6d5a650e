"""The coordinator: federation CA and enrollment, contribution intake, registry, releases.

Imports ``protocols`` only, never ``node``. Its services land with their issues.
"""
