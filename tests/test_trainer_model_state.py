"""The trainer keeps a model's forward-pass state (BatchNorm statistics): updated every step,
EMA'd, checkpointed and restored, and handed to evaluation and export."""

import batchnorm_task
import jax
import numpy as np
import pytest

from pretrain import modes, trainer


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_batch_statistics_are_trained_averaged_saved_and_used(tmp_path):
    config = batchnorm_task.get_config()
    batchnorm_task.SEEN_MODEL_STATES.clear()
    trainer.train_and_evaluate(config, str(tmp_path))
    _, state = modes.restore_trained(config, str(tmp_path), "latest")
    mean, var = leaves(state["model_state"])
    # Started at mean 0 / var 1; six updates at momentum 0.9 from the data's batch statistics.
    assert np.abs(mean).max() > 1e-3 and not np.allclose(var, 1.0)
    ema_mean, _ = leaves(state["ema_model_state"])
    assert not np.allclose(ema_mean, mean)  # averaged with decay 0.5, lags the live statistics
    # Evaluation at steps 3 and 6 received the live and the EMA statistics.
    assert len(batchnorm_task.SEEN_MODEL_STATES) == 4
    np.testing.assert_array_equal(leaves(batchnorm_task.SEEN_MODEL_STATES[2])[0], mean)
    np.testing.assert_array_equal(leaves(batchnorm_task.SEEN_MODEL_STATES[3])[0], ema_mean)
    modes.export_checkpoint(config, str(tmp_path), str(tmp_path / "export"), use_ema=True)
    np.testing.assert_array_equal(leaves(batchnorm_task.SEEN_MODEL_STATES[-1])[0], ema_mean)


def test_statistics_follow_the_data_from_a_restored_checkpoint(tmp_path):
    config = batchnorm_task.get_config()
    config.schedule.decay = "constant"  # the same learning rates whatever total_steps says
    config.total_steps = 3
    trainer.train_and_evaluate(config, str(tmp_path / "a"))
    config.total_steps = 6
    trainer.train_and_evaluate(config, str(tmp_path / "a"))  # resumes at 3
    straight = batchnorm_task.get_config()
    straight.schedule.decay = "constant"
    trainer.train_and_evaluate(straight, str(tmp_path / "b"))
    _, resumed = modes.restore_trained(config, str(tmp_path / "a"), "latest")
    _, direct = modes.restore_trained(straight, str(tmp_path / "b"), "latest")
    for a, b in zip(leaves(resumed["model_state"]), leaves(direct["model_state"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_with_batch_statistics_is_refused(tmp_path):
    config = batchnorm_task.get_config()
    config.grad_accum_steps = 2
    with pytest.raises(ValueError, match="grad_accum_steps"):
        trainer.train_and_evaluate(config, str(tmp_path))
