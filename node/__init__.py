"""The RadFed node: the edge appliance a hospital runs.

``deid`` de-identifies DICOM (PS3.15 Annex E, deny by default) and keeps the
encrypted re-identification vault; ``settings`` is the node's configuration;
``cli`` the ``radfed node`` commands. Imports ``protocols`` only, never
``coordinator``.
"""
