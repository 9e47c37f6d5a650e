"""The coordinator's HTTP API (``/api/v1``, FastAPI) served over TLS."""
