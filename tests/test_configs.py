"""Config files: every argument combination builds, numbers match the papers, bad input fails."""

import jax
import jax.numpy as jnp
import pytest

from configs.clip_vitb16 import get_config
from configs.common import parse_arg
from pretrain import sharding, train_step
from pretrain import state as state_lib
from pretrain.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from pretrain.tasks.clip import Task


def test_clip_vitb16_reproduces_table_11():
    config = get_config()
    assert config.data.image_size == 224
    assert config.model.text.context_length == 77
    assert tuple(config.data.random_resized_crop_scale) == (0.9, 1.0)
    assert tuple(config.data.random_resized_crop_ratio) == (0.75, 1.33)
    assert config.total_steps == 200_000
    assert config.schedule.warmup_steps == 2_000
    assert config.batch_size == 65_536
    assert (config.optimizer.name, config.optimizer.b1, config.optimizer.b2) == ("adamw", 0.9, 0.95)
    assert (config.schedule.peak_lr, config.schedule.end_lr) == (1e-3, 1e-6)
    assert config.schedule.decay == "cosine"
    assert config.optimizer.weight_decay == 0.2
    assert config.model.dtype == "bfloat16"
    assert config.ema_decay == 0.9995


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    config = get_config()
    schedule = learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(1_000)) == pytest.approx(0.5e-3)
    assert float(schedule(2_000)) == pytest.approx(1e-3)
    # Halfway through the decay the cosine is at the mean of peak and end.
    middle = 2_000 + (200_000 - 2_000) // 2
    assert float(schedule(middle)) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-4)
    assert float(schedule(200_000)) == pytest.approx(1e-6)


def test_weight_decay_skips_biases_and_one_dimensional_parameters():
    params = {
        "attn": {"query": {"kernel": jnp.zeros((4, 2, 2)), "bias": jnp.zeros((2, 2))}},
        "ln_1": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
        "class_embedding": jnp.zeros(4),
        "logit_scale": jnp.zeros(()),
        "positional_embedding": jnp.zeros((5, 4)),
    }
    mask = weight_decay_mask(params)
    assert mask["attn"]["query"] == {"kernel": True, "bias": False}
    assert mask["ln_1"] == {"scale": False, "bias": False}
    assert not mask["class_embedding"] and not mask["logit_scale"]
    assert mask["positional_embedding"]
    assert not weight_decay_mask(params, ("positional",))["positional_embedding"]


@pytest.mark.parametrize(
    "arg,image_width,text_width,embed",
    [
        ("", 768, 512, 512),
        ("variant=L/14", 1024, 768, 768),
        ("variant=H/14,loss=sigmoid", 1280, 1024, 1024),
    ],
)
def test_variants_build_the_open_clip_shapes(arg, image_width, text_width, embed):
    config = get_config(arg)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    task = Task(config, mesh)
    params, _ = jax.eval_shape(task.init_variables, jax.random.key(0))
    assert params["image_encoder"]["class_embedding"].shape == (image_width,)
    assert params["text_encoder"]["ln_final"]["scale"].shape == (text_width,)
    assert params["image_encoder"]["proj"].shape == (image_width, embed)
    assert ("logit_bias" in params) == ("sigmoid" in arg)


def test_config_arguments_are_checked():
    parsed = parse_arg("runlocal,variant=L/14", runlocal=False, variant="B/16")
    assert parsed.to_dict() == {"runlocal": True, "variant": "L/14"}
    with pytest.raises(ValueError, match="unknown config argument 'varient'"):
        get_config("varient=L/14")
    with pytest.raises(ValueError, match="text tower is defined for"):
        get_config("variant=Q/16")
    config = get_config("loss=hinge")
    with pytest.raises(ValueError, match=r"config\.loss\.name=.hinge."):
        Task(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))


def test_full_recipe_compiles_one_sharded_step_on_8_devices():
    """The ViT-B/16 recipe (reduced batch) lowers and compiles on a (data 2, fsdp 4) mesh."""
    config = get_config()
    config.batch_size = 8
    config.mesh.update({"data": 2, "fsdp": 4})
    mesh = sharding.make_mesh(config.mesh)
    task = Task(config, mesh)
    tx, schedule = make_optimizer(config)
    build = state_lib.init_state(task, tx, seed=0, use_ema=True)
    abstract = jax.eval_shape(build)
    shardings = sharding.tree_shardings(abstract, mesh)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    batch = {
        "image": jax.ShapeDtypeStruct(
            (8, 224, 224, 3), jnp.uint8, sharding=sharding.batch_sharding(mesh, 4)
        ),
        "text": jax.ShapeDtypeStruct((8, 77), jnp.int32, sharding=sharding.batch_sharding(mesh, 2)),
    }
    step = train_step.make_train_step(task, tx, schedule, mesh, ema_decay=config.ema_decay)
    compiled = jax.jit(step, out_shardings=(shardings, None)).lower(state, batch).compile()
    # Parameters and both Adam moments are split 4 ways over fsdp: per-device state memory is
    # far below the replicated 3 x 150M x 4 bytes (+ EMA).
    memory = compiled.memory_analysis()
    if memory is not None:
        assert memory.argument_size_in_bytes < 0.5 * 4 * 4 * 149_620_737


@pytest.mark.parametrize("size,mask_ratio", [("b", 0.4), ("l", 0.5)])
def test_uta_recipes_reproduce_paper_004(size, mask_ratio):
    import importlib

    config = importlib.import_module(f"configs.uta_vit{size}").get_config()
    assert config.model.student.variant == f"uta_{'base' if size == 'b' else 'large'}/16"
    assert config.data.image_size == 224
    assert config.batch_size == 4096
    # 150 epochs of ImageNet-21K, 1 warm-up epoch.
    assert config.total_steps == -(-150 * 14_197_122 // 4096)
    assert config.schedule.warmup_steps == -(-14_197_122 // 4096)
    assert (config.schedule.peak_lr, config.schedule.end_lr) == (1.5e-3, 1e-5)
    assert (config.optimizer.name, config.optimizer.weight_decay) == ("adamw", 0.05)
    assert config.masking.mask_ratio == mask_ratio
    assert config.masking.reverse_probability == 0.5
    assert config.teacher.open_clip_model == "EVA01-g-14"


@pytest.mark.parametrize(
    "size,lr,layer_decay,steps",
    [("b", 2e-4, 0.75, 40_691), ("l", 4e-4, 0.85, 81_381)],  # ceil(2e9 / 49152), ceil(4e9 / ...)
)
def test_uta_fine_tuning_recipes_reproduce_paper_004(size, lr, layer_decay, steps):
    import importlib

    from pretrain.export import open_clip
    from pretrain.export.open_clip_configs import open_clip_model_config_by_name

    config = importlib.import_module(f"configs.uta_ft_vit{size}").get_config()
    assert config.batch_size == 49_152
    assert config.total_steps == steps  # 2B (B) / 4B (L) samples
    assert config.loss.fixed_logit_scale == 100.0  # temperature 0.01
    optimizer = config.optimizer
    assert (optimizer.name, optimizer.min_trust, optimizer.max_trust) == ("lamb", 0.01, 10.0)
    assert (optimizer.layer_decay, optimizer.weight_decay) == (layer_decay, 0.05)
    assert (config.schedule.peak_lr, config.schedule.end_lr) == (lr, 0.0)
    # The text tower is the teacher's (EVA01-CLIP-g/14).
    teacher = open_clip.jax_model_kwargs(open_clip_model_config_by_name("EVA01-g-14"))
    text = teacher["text_encoder"]
    assert (config.model.text.width, config.model.text.depth) == (text["width"], text["depth"])
    assert config.model.text.num_heads == text["num_heads"]
    assert config.model.embed_dim == text["output_dim"]


@pytest.mark.parametrize(
    "variant,width,peak_lr,end_lr",
    [("B/16", 768, 1e-3, 1e-5), ("L/16", 1024, 6e-4, 6e-6), ("H/16", 1280, 4e-4, 4e-6)],
)
def test_catlip_recipes_reproduce_table_6(variant, width, peak_lr, end_lr):
    from configs.catlip_vitb16 import get_config

    config = get_config(f"variant={variant}")
    assert config.task == "pretrain.tasks.catlip"
    assert config.model.image.variant == variant
    assert config.total_steps == 200_000
    assert config.batch_size == 65_536  # 1024 x 64, 512 x 128, 256 x 256 GPUs
    assert (config.schedule.decay, config.schedule.peak_lr, config.schedule.end_lr) == (
        "cosine",
        peak_lr,
        end_lr,
    )
    assert config.schedule.warmup_steps == 10_000
    opt = config.optimizer
    assert (opt.name, opt.b1, opt.b2, opt.weight_decay, opt.grad_clip_norm) == (
        "adamw",
        0.9,
        0.999,
        0.2,
        1.0,
    )
    assert config.ema_decay == 0.9995
    assert config.model.dtype == "bfloat16"
    assert config.vocab.min_count == 500  # V_tau
    assert config.range_augment.enabled and config.data.random_horizontal_flip
    from models.vit import VisionTransformer

    assert VisionTransformer.from_variant(variant, output_dim=None).width == width


@pytest.mark.parametrize(
    "mode,epochs,batch,peak_lr,end_lr,weight_decay",
    [("linear_probe", 30, 256, 3e-5, 1e-6, 0.0), ("finetune", 10, 128, 3e-5, 3e-6, 0.05)],
)
def test_catlip_transfer_recipes_reproduce_table_7(
    mode, epochs, batch, peak_lr, end_lr, weight_decay
):
    from configs.catlip_transfer import get_config

    config = get_config(f"mode={mode}")
    assert config.transfer.mode == mode and config.transfer.head_init == "transfer"
    assert config.batch_size == batch
    assert config.total_steps == -(-epochs * 1_281_167 // batch)
    assert (config.schedule.peak_lr, config.schedule.end_lr) == (peak_lr, end_lr)
    assert (config.optimizer.b1, config.optimizer.b2) == (0.9, 0.999)
    assert config.optimizer.weight_decay == weight_decay
    with pytest.raises(ValueError, match="Table 7"):
        get_config("mode=probe")
