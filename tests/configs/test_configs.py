"""Every config composes against the typed schema; bad keys and values fail before any compute."""

import pytest
from conftest import CONFIGS, compose, run_cli
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from emfm.config.schema import ConfigError

COMMANDS = ["main", "pretrain", "probe", "export"]
RECIPES = sorted(p.stem for p in (CONFIGS / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    import os

    from conftest import shared_data

    root = shared_data().parent  # ../shared/data: the corpus's sources
    if root.is_dir():
        os.environ.setdefault("EMFM_SHARED_DATA_ROOT", str(root))
    cfg = compose(
        "pretrain", ["data=corpus", f"recipe={recipe}"] if root.is_dir() else [f"recipe={recipe}"]
    )
    assert cfg.trainer.steps > 0 and cfg.model.name in ("vit", "unet")


MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
REGIMES = sorted(p.stem for p in (CONFIGS / "regime").glob("*.yaml"))


@pytest.mark.parametrize("regime", REGIMES)
def test_every_regime_composes_and_validates(regime):
    cfg = compose(
        "finetune", [f"regime={regime}", "checkpoint=zoo:em_unet16", "model=unet2d", "head=unet"]
    )
    assert cfg.regime.name == regime
    if regime == "finetune_sp":  # shrink and perturb of a pretrained start
        assert (cfg.regime.init, cfg.regime.shrink, cfg.regime.perturb) == ("pretrained", 0.2, 0.8)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_config_composes(cmd):
    cfg = compose(cmd)
    assert cfg.model.name == (
        "unet" if cmd == "main" else "vit"
    )  # the main job trains the zoo's U-Net
    tiny = compose(cmd, ["debug=tiny"])
    assert tiny.trainer.steps < 10 and tiny.model.depth == 2


@pytest.mark.parametrize("model", MODELS)
def test_every_model_builds_abstractly(model):
    import jax
    from flax import nnx

    from emfm.train.state import build_pretraining_model

    three_d = "3d" in model
    shape = [16, 64, 64] if three_d else [1, 64, 64]
    objective = "mim_unet" if model.startswith("unet") else "mae"
    cfg = compose(
        "pretrain",
        [
            f"model={model}",
            f"objective={objective}",
            f"data.patch_shape=[{','.join(map(str, shape))}]",
        ],
    )
    abstract = nnx.eval_shape(lambda: build_pretraining_model(cfg.model, cfg.objective))
    spatial = tuple(shape) if three_d else tuple(shape[1:])
    x = jax.ShapeDtypeStruct((2, *spatial, 1), "float32")
    out = jax.eval_shape(lambda m, x: m.encoder(x)[1]["patch_map"], abstract, x)
    assert out.shape[:-1] == (2, *(s // p for s, p in zip(spatial, cfg.model.patch_size)))


def test_model_sizes_stay_with_their_family():
    """finetune's default ViT size is its own model config: choosing another encoder keeps that
    encoder's widths (model=unet3d: 16..128 channels, 1.4 M parameters, not a width-64 variant)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from emfm.config import schema

    schema.register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):

        def ft(*over):
            c = hydra_compose("finetune", overrides=[*over, "run_dir=unused"])
            return schema.validate_finetune(OmegaConf.to_object(c)).model

        vit, unet3d, unet2d = ft(), ft("model=unet3d", "head=unet"), ft("model=unet2d", "head=unet")
    assert (vit.name, vit.width, vit.depth, vit.heads) == ("vit", 64, 4, 4)
    assert (unet3d.name, unet3d.width, unet3d.depth) == ("unet", 16, 4)
    assert unet2d.width == compose("pretrain", ["model=unet2d", "objective=mim_unet"]).model.width


def test_unknown_key_is_rejected_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose("main", ["model.nonsense_key=3"])
    assert "nonsense_key" in str(e.value) + str(e.value.__cause__)


def test_wrong_type_is_rejected_naming_it():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose("main", ["trainer.steps=many"])
    assert "steps" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize(
    "override,key",
    [
        ("objective.mask_ratio=1.5", "objective.mask_ratio"),
        ("data.patch_shape=[1,60,64]", "data.patch_shape"),
        ("data.patch_shape=[4,64,64]", "data.patch_shape"),
        ("probe.test_slices=[5,2]", "probe.test_slices"),
        ("export.tile=100", "export.tile"),
        ("probe.margin=12", "probe.margin"),
        ("objective.target_blur=-1", "objective.target_blur"),
        ("model.dtype=int8", "model.dtype"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose("main", [override])


def test_cli_reports_config_errors_without_compute():
    res = run_cli("pretrain", "model.nonsense_key=3", timeout=120)
    assert res.returncode != 0
    assert "nonsense_key" in res.stderr + res.stdout
    res = run_cli("pretrain", "objective.mask_ratio=0", timeout=120)
    assert res.returncode == 2
    assert "emfm: error: objective.mask_ratio" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_help_and_unknown_command():
    res = run_cli("--help", timeout=60)
    assert res.returncode == 0 and "pretrain" in res.stdout
    res = run_cli("frobnicate", timeout=60)
    assert res.returncode == 2 and "unknown command" in res.stderr


@pytest.mark.parametrize(
    "config,override,message",
    [
        ("main", "trainer.nonfinite=maybe", "trainer.nonfinite='maybe': use stop or skip"),
        ("main", "model.dtype=int8", "model.dtype='int8': use float32, bfloat16 or float16"),
        ("main", "probe.upsample=nearest", "probe.upsample='nearest': use bilinear or subpixel"),
        ("finetune", "regime.semi=foo", "regime.semi='foo': use none, mean_teacher or fixmatch"),
        ("finetune", "loss.terms=[ce,lovasz]", "loss.terms has 'lovasz': use ce, dice or focal"),
    ],
)
def test_option_outside_its_set_names_the_key_and_the_allowed_values(config, override, message):
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        compose(config, [override])
