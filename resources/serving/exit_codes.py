"""How a worker says why it exits, in its exit code. Nothing imported: a worker reads this at start,
before its model loads, and the supervisor through ``resources.serving.protocol``."""

# sysexits.h EX_CONFIG: the worker's configuration (here, its artifact) is not what it was told to serve.
# A worker whose bytes do not hash to the release's digest exits with it; the supervisor does not
# restart it as a crash, and says why.
EXIT_ARTIFACT_REFUSED = 78
