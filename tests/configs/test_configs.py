"""Every config composes against the typed schema; bad keys and values fail before any compute."""

import dataclasses
import json

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
    import yaml

    init = yaml.safe_load((CONFIGS / "regime" / f"{regime}.yaml").read_text())["init"]
    over = [f"regime={regime}", "model=unet2d", "head=unet"]
    ckpt = ["checkpoint=zoo:em_unet16"]
    cfg = compose("finetune", over + (ckpt if init == "pretrained" else []))
    assert cfg.regime.name == regime
    if init == "scratch":  # a checkpoint would be ignored: an error, and with init=pretrained used
        with pytest.raises(ConfigError, match="add regime.init=pretrained"):
            compose("finetune", over + ckpt)
        assert compose("finetune", over + ckpt + ["regime.init=pretrained"]).checkpoint
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


ZOO_UNET = "checkpoint=zoo:em_unet16 model=unet2d head=unet"


@pytest.mark.parametrize(
    "config,override,key",
    [
        ("main", "objective.mask_ratio=1.5", "objective.mask_ratio"),
        ("main", "data.patch_shape=[1,60,64]", "data.patch_shape"),
        ("main", "data.patch_shape=[4,64,64]", "data.patch_shape"),
        ("main", "probe.test_slices=[5,2]", "probe.test_slices"),
        ("main", "export.tile=100", "export.tile"),
        ("main", "probe.margin=12", "probe.margin"),
        # the clustering regime's tiles, for the zoo U-Net's pooling of 8
        ("finetune", f"regime=kmeans {ZOO_UNET} regime.tile=60", "regime.tile"),
        ("finetune", f"regime=gmm {ZOO_UNET} regime.margin=12", "regime.margin"),
        ("finetune", f"regime=finetune_lpft {ZOO_UNET} trainer.steps=100", "regime.frozen_steps"),
        ("finetune", f"regime=frozen {ZOO_UNET} regime.frozen_steps=5", "regime.frozen_steps"),
        ("pretrain", "objective.target_blur=-1", "objective.target_blur"),
        ("pretrain", "objective=dino objective.teacher_temp=0", "objective.teacher_temp"),
    ],
)
def test_bad_values_name_the_key(config, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(config, override.split())


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


CHOICES = [  # (config, override, the key as OmegaConf names it, the allowed values)
    ("main", "trainer.nonfinite=maybe", "trainer.nonfinite", "[stop, skip]"),
    ("main", "model.dtype=int8", "model.dtype", "[float32, bfloat16, float16]"),
    ("main", "probe.upsample=nearest", "probe.upsample", "[bilinear, subpixel]"),
    ("pretrain", "objective.target_norm=pixel", "objective.target_norm", "[patch, image, none]"),
    ("export", "export.blend=linear", "export.blend", "[auto, cosine, gaussian, constant, none]"),
    ("finetune", "regime.semi=foo", "regime.semi", "[none, mean_teacher, fixmatch]"),
    ("finetune", "task.kind=mask", "task.kind", "[semantic, boundary, affinity, center]"),
    ("finetune", "loss.terms=[ce,lovasz]", "loss.terms[1]", "[ce, dice, focal]"),
    ("predict", "predict.blend=max", "predict.blend", "[cosine, gaussian, constant]"),
    (
        "predict",
        "predict.instances=magic",
        "predict.instances",
        "[none, watershed, link2d, agglomeration, multicut, mws]",
    ),
    (
        "predict",
        "instances.link_2d=mws",
        "instances.link_2d",
        "[watershed, agglomeration]",
    ),
    (
        "instances",
        "method=foo",
        "method",
        "[watershed, link2d, agglomeration, multicut, mws]",
    ),
    ("instances", "link_criterion=dice", "link_criterion", "[fraction, iou]"),
    ("instances", "link_2d=mws", "link_2d", "[watershed, agglomeration]"),
]


@pytest.mark.parametrize("config,override,key,allowed", CHOICES)
def test_option_outside_its_set_fails_as_the_config_is_composed(config, override, key, allowed):
    """A string option is a Choice: OmegaConf rejects a value outside its set while composing,
    naming the key, the value and the allowed values."""
    value = override.split("=")[1].strip("[]").split(",")[-1]
    with pytest.raises(ConfigCompositionException) as e:
        compose(config, [override])
    message = f"{e.value}\n{e.value.__cause__}"
    assert f"Invalid value '{value}', expected one of {allowed}" in message
    assert f"full_key: {key}" in message


def test_cli_reports_an_option_outside_its_set():
    res = run_cli("pretrain", "model.dtype=int8", timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    out = res.stderr + res.stdout
    assert "Invalid value 'int8', expected one of [float32, bfloat16, float16]" in out
    assert "full_key: model.dtype" in out
    res = run_cli("finetune", "regime.semi=foo", timeout=120)
    assert res.returncode != 0
    assert "expected one of [none, mean_teacher, fixmatch]" in res.stderr + res.stdout


def test_choices_compare_and_print_as_strings():
    cfg = compose("finetune", ["regime=mean_teacher", "predict.dtype=float32"])
    assert cfg.regime.semi == "mean_teacher" and cfg.predict.dtype in ("float32",)
    assert f"{cfg.regime.semi}" == "mean_teacher" and repr(cfg.regime.semi) == "'mean_teacher'"
    assert {"mean_teacher": 1}[cfg.regime.semi] == 1
    assert json.dumps(dataclasses.asdict(cfg.regime))  # checkpoint records are JSON


def test_choices_match_the_library_registries():
    """Choices that mirror a registry or a list of the library hold exactly its names."""
    from emfm import models
    from emfm.config import common, export, finetune, instances, probe
    from emfm.eval import linear_probe, probes, tasks
    from emfm.export import encode, features
    from emfm.instances import link2d, tune
    from emfm.instances.segment import METHODS
    from emfm.models import unet

    pairs = [
        (common.Encoder, models.ENCODERS),
        (common.Norm, unet.NORMS),
        (export.FeatureDType, features.OUT_DTYPES),
        (export.ExportBlend, encode.BLENDS),
        (probe.Probe, probes.PROBES),
        (probe.Upsample, linear_probe.UPSAMPLING),
        (probe.ProbeTarget, tasks.TARGETS),
        (probe.Split, tasks.SPLITS),
        (instances.TuneMetric, tune.METRICS),
        (instances.InstanceMethod, METHODS),
        (instances.LinkCriterion, link2d.CRITERIA),
        (instances.Link2D, link2d.METHODS_2D),
        (finetune.PredictInstances, ("none",) + METHODS),
    ]
    for choice, names in pairs:
        assert sorted(choice) == sorted(names), choice.__name__
        assert all(m.name == m.value for m in choice)


def test_every_objective_composes_to_its_own_config():
    from emfm import objectives
    from emfm.config.objective import OBJECTIVE_CONFIGS, TeacherFields

    assert sorted(OBJECTIVE_CONFIGS) == sorted(objectives.OBJECTIVES)
    for name, cls in OBJECTIVE_CONFIGS.items():
        model = ["model=unet2d"] if name == "mim_unet" else []
        o = compose("pretrain", [f"objective={name}", *model]).objective
        assert type(o) is cls and o.name == name
        # the EMA teacher's momentum is a field of exactly the objectives with a teacher
        assert isinstance(o, TeacherFields) == objectives.get(name).teacher, name


@pytest.mark.parametrize(
    "objective,key,dataclass",
    [("mae", "prototypes", "MAEConfig"), ("dino", "decoder_width", "DINOConfig")],
)
def test_a_key_of_another_objective_is_rejected(objective, key, dataclass):
    with pytest.raises(ConfigCompositionException) as e:
        compose("pretrain", [f"objective={objective}", f"objective.{key}=3"])
    assert f"Key '{key}' not in '{dataclass}'" in str(e.value.__cause__)
    assert f"full_key: objective.{key}" in str(e.value.__cause__)


def test_cli_rejects_a_key_of_another_objective():
    res = run_cli("pretrain", "objective=mae", "objective.prototypes=3", timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "Key 'prototypes' not in 'MAEConfig'" in res.stderr + res.stdout


def test_the_objective_is_chosen_by_its_config_not_by_its_name():
    with pytest.raises(ConfigError, match=r"objective.name='mae_dino' .*objective=mae_dino"):
        compose("pretrain", ["objective.name=mae_dino"])


def test_debug_tiny_shrinks_the_objectives_decoder_where_it_has_one():
    assert compose("pretrain", ["objective=mae_simclr", "debug=tiny"]).objective.decoder_width == 32
    assert compose("pretrain", ["recipe=vit4_mae", "debug=tiny"]).objective.decoder_width == 32
    dino = compose("pretrain", ["objective=dino", "debug=tiny"]).objective
    assert not hasattr(dino, "decoder_width") and dino.prototypes == 1024


def test_saved_configs_load(tmp_path):
    """config.yaml of run directories and of the zoo, and checkpoint records, load into the typed
    configs, also those written with the flat objective of every objective's fields."""
    from omegaconf import OmegaConf

    from emfm import zoo
    from emfm.config.objective import DINODenseConfig
    from emfm.config.schema import FinetuneConfig, load_saved, objective_from_record
    from emfm.train import checkpoint

    entry = zoo.path_of("em_unet16")
    saved = load_saved(entry)
    assert type(saved.objective) is DINODenseConfig and saved.model.name == "unet"
    o = saved.objective
    assert o.local_crop_scale == [1.0, 1.0] and o.target_norm is None and o.mim_weight == 0.0
    meta = checkpoint.read_meta(checkpoint.find_checkpoint_dir(entry))
    assert "decoder_width" in meta["objective"]  # a record of the flat objective
    assert objective_from_record(meta["objective"]) == o
    assert load_saved(CONFIGS.parent / "experiments/foundation/long_run").trainer.steps > 0
    for cmd in ("main", "pretrain", "finetune", "predict"):
        cfg = compose(cmd, ["predict.instances=watershed"] if cmd == "predict" else [])
        (tmp_path / cmd).mkdir()
        (tmp_path / cmd / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        back = load_saved(tmp_path / cmd)
        assert back == cfg and type(back) is type(cfg)
        assert isinstance(back, FinetuneConfig) == (cmd in ("finetune", "predict"))
    # predict.instances was a string, "" for probabilities only
    old = (tmp_path / "finetune" / "config.yaml").read_text()
    assert "  instances: none\n" in old
    (tmp_path / "finetune" / "config.yaml").write_text(
        old.replace("instances: none", "instances: ''")
    )
    assert load_saved(tmp_path / "finetune").predict.instances == "none"


def test_the_main_job_takes_another_objective():
    """The main job's objective settings are its objective config (dino_dense_weak), so choosing
    another objective leaves none of them behind."""
    main = compose("main").objective
    assert (main.name, main.local_crop_scale, main.mask_ratio) == ("dino_dense", [1.0, 1.0], 0.0)
    mae = compose("main", ["debug=tiny", "model=vit_ti_p8", "objective=mae"]).objective
    assert mae.name == "mae" and mae.decoder_width == 32


def test_a_zoo_checkpoint_brings_its_architecture_to_pretraining():
    cfg = compose("pretrain", ["checkpoint=zoo:em_unet16_hc15k", "recipe=unet_dino_dense_hc"])
    assert (cfg.model.name, cfg.model.width, cfg.model.depth) == ("unet", 16, 4)
