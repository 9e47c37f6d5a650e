"""``radfed demo``: the whole federation on one machine, from PHI-laden exports to a model.

``cli`` is the command, ``flow`` the stages (setup through the CLI, services as
processes, review, release and training through the HTTP APIs), ``services``
the processes it starts and stops, ``summary`` what it reports at the end.
"""
