"""Test set-up: eight fake CPU devices for sharding tests, set before JAX is imported anywhere,
a private TFDS data folder (TFDS reads TFDS_DATA_DIR when it is imported) and a compilation
cache shared by the test run."""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Each pytest process (xdist worker) builds the small embedded data sets it needs in its own
# folder, so concurrent builds never race.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="tfds_tests_")
# Many tests compile the same tiny programs (in this process, in the other xdist worker and in
# the training processes they launch): XLA's persistent cache compiles each once per test run.
# Set by the first process (pytest's main one); workers and launched processes inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_cache_tests_")

import pytest  # noqa: E402 - after the environment above, like every import of JAX


@pytest.fixture(scope="session")
def teacher_workdir(tmp_path_factory):
    """A tiny CLIP trained for a few steps (the foundation's run, shrunk): the teacher of the UTA
    and reinforced-training tests, trained once per test session."""
    import tiny_clip_config

    from pretrain import trainer

    workdir = tmp_path_factory.mktemp("teacher")
    config = tiny_clip_config.get_config()
    config.total_steps = 4
    config.eval.every_steps = 0
    trainer.train_and_evaluate(config, str(workdir))
    return str(workdir)
