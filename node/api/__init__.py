"""The node's HTTP API (FastAPI, ``/api/v1``), served by ``radfed node serve``."""
