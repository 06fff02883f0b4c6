"""What the deployer, the supervisor and the workers agree on (standard library only: the supervisor
and the workers import it at start).

A worker that refuses its artifact (the bytes on disk do not hash to the release's digest) exits with
``EXIT_ARTIFACT_REFUSED``; the supervisor does not restart it as a crash, and says why.
"""

from __future__ import annotations

# sysexits.h EX_CONFIG: the worker's configuration (here, its artifact) is not what it was told to serve
EXIT_ARTIFACT_REFUSED = 78
