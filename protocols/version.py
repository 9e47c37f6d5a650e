"""Versions the two sides of the federation check against each other."""

from __future__ import annotations

#: Version of the node <-> coordinator HTTP protocol (``/api/v1``).
PROTOCOL_VERSION = "1.2"

#: Version of RadFed's de-identification profile (table edition + keep-list + rules).
#: Bump when a change to ``protocols/deid`` changes what an output file may contain.
DEID_PROFILE_VERSION = "2025.1"

#: RadFed software version, written into de-identified files' meta.
SOFTWARE_VERSION = "0.1.0"
