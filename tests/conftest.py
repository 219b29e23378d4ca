"""Test set-up: eight fake CPU devices for sharding tests, set before JAX is imported anywhere,
and a private TFDS data folder (TFDS reads TFDS_DATA_DIR when it is imported)."""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Each pytest process (xdist worker) builds the small embedded data sets it needs in its own
# folder, so concurrent builds never race.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="tfds_tests_")
