"""The node's Flower SuperNode, supervised by ``radfed node serve``.

It dials the federation's SuperLink over TLS (trusting only the federation CA)
and authenticates with the node key in OpenSSH form. Its ``PATH`` starts with a
folder whose ``flwr-clientapp`` is the node's gate (``node.training.gate``), so
every message of every run passes the site's training policy before app code
runs. Flower's state and installed app bundles live under ``<home>/training``.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from node import federation
from node.settings import NodeSettings
from protocols.process import Supervised, tool, tool_path
from protocols.storage import private_dir, write_private


def write_shim(folder: Path) -> Path:
    """``<folder>/flwr-clientapp``: runs the gate with this interpreter."""
    private_dir(folder)
    script = folder / "flwr-clientapp"
    text = (
        "#!/bin/sh\n"
        "# Written by radfed node serve: Flower's ClientApp process passes the site's gate.\n"
        f'exec {shlex.quote(sys.executable)} -m node.training.gate "$@"\n'
    )
    write_private(script, text.encode("utf-8"), 0o700)
    return script


def supernode(settings: NodeSettings) -> Supervised | None:
    """The supervised SuperNode of an enrolled node, or None (not enrolled, no SuperLink)."""
    if not settings.flower_enabled or not federation.enrolled(settings):
        return None
    address = federation.superlink_address(settings)
    if not address:
        return None
    where = federation.files(settings)
    key = federation.write_supernode_key(settings)
    training = settings.training_dir.resolve()
    home = training / "flower"
    private_dir(home)
    shim = write_shim(training / "bin")
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RADFED_NODE_HOME=str(settings.home.resolve()),
        PATH=os.pathsep.join([str(shim.parent), tool_path()]),
        PYTHONUNBUFFERED="1",
    )
    site = federation.site_name(settings) or settings.site_id
    argv = [
        tool("flower-supernode"),
        "--superlink",
        address,
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.supernode_port),
        "--root-certificates",
        str(where.ca.resolve()),
        "--auth-supernode-private-key",
        str(key.resolve()),
        "--node-config",
        f'radfed-site="{site}"',
    ]
    return Supervised("supernode", argv, env, training / "supernode.log", cwd=home)
