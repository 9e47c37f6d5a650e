"""Wire models of RadFed's HTTP APIs (``/api/v1``): what crosses a process boundary.

``errors`` is the one error body every endpoint returns; ``node`` the node API
(index search, study detail, counts, quarantine). Database tables stay inside
the service that owns them and are never returned as they are.
"""
