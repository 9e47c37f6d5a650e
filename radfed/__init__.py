"""RadFed's composition root: the ``radfed`` CLI, the demo, the researcher client and
the synthetic DICOM generators (``radfed.synth``) the demo, benchmarks and tests share.

It may import ``protocols``, ``node`` and ``coordinator``; nothing imports it. It
holds no domain logic.
"""

__version__ = "0.1.0"
