"""Config loading: defaults, YAML, dotted overrides, and errors that name the key."""

import dataclasses
import inspect
import math
import typing
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from curation.config import CurateConfig, load_curate_config
from curation.config import validate as validate_curation
from learner.main import main
from motionnft_core.cli import run_command
from motionnft_core.config import (
    Config,
    ConfigError,
    DataConfig,
    FlowRewardConfig,
    NFTConfig,
    Rule,
    _f,
    _Section,
    validate,
)
from motionnft_core.config_loader import config_from_dict, config_to_dict, describe, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = ["model.tiny=true", "data.synthetic=8", "reward.judge.tiny=true"]


def test_defaults_are_the_published_values():
    cfg = load_config(None, MINIMAL)
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.num_steps) == (8, 24, 6)
    assert cfg.samples_per_step == 192
    f = cfg.reward.flow
    assert (f.q, f.motion_threshold, f.tau, f.kappa) == (0.4, 0.002, 0.01, 0.5)
    assert (f.w_magnitude, f.w_direction, f.w_move) == (0.7, 0.2, 0.1)
    n = cfg.nft
    assert (n.beta, n.lr, n.weight_decay, n.grad_clip, n.lora_rank, n.lora_alpha) == (1.0, 3e-4, 1e-4, 1.0, 32, 64)
    assert n.lora_targets[-1] == "to_add_out" and len(n.lora_targets) == 8
    assert (cfg.reward.flow_weight, cfg.reward.judge_weight) == (0.5, 0.5)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    """Every value a shipped config sets is what the loaded config holds (a section or key the loader did not
    take would show here), and the loaded config round-trips through its dict form (a run's config.json). The
    curation's configs (curate_*.yaml) are read by its own schema."""
    path = ROOT / "configs" / name
    curation = name.startswith("curate_")
    cfg = load_curate_config(path) if curation else load_config(path)
    loaded = config_to_dict(cfg)

    def leaves(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            if isinstance(value, dict) and isinstance(_at(loaded, prefix + key), dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value

    for key, value in leaves(yaml.safe_load(path.read_text())):
        got = _at(loaded, key)
        assert got == (list(value) if isinstance(value, tuple) else value) or got == pytest.approx(value), key
    schema = (CurateConfig, validate_curation) if curation else (Config, validate)
    assert config_from_dict(loaded, *schema) == cfg


def _at(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {tiny: true}\ndata: {synthetic: 8}\nreward: {judge_weight: 0.0}\nrollout: {group_size: 4}\n"
    )
    cfg = load_config(path, ["rollout.group_size=6", "nft.beta=0.5", "nft.lora_targets=[to_q, to_k]"])
    assert cfg.rollout.group_size == 6 and cfg.nft.beta == 0.5
    assert cfg.nft.lora_targets == ("to_q", "to_k")
    assert cfg.nft.lr == 3e-4  # untouched keys keep their defaults


def test_int_accepted_for_float():
    assert load_config(None, MINIMAL + ["nft.beta=1"]).nft.beta == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.group_sise=4", "rollout.group_sise: unknown key; did you mean 'rollout.group_size'?"),
        ("rollout.group_size=1", "rollout.group_size: expected K >= 2"),
        ("rollout.group_size=four", "rollout.group_size: expected an integer, got 'four'"),
        ("rollout.height=100", "rollout.height: expected a multiple of 16"),
        ("nft.beta=-1", "nft.beta: expected a value > 0"),
        ("model.family=sd3", "model.family: expected one of"),
        ("model.tiny=yes please", "model.tiny: expected true/false"),
        ("reward.flow.estimator=gmflow", "reward.flow.estimator: expected one of"),
        ("reward.flow_weight=0", None),  # valid alone ...
        ("cluster.learner_ranks=0", "cluster.learner_ranks: expected an integer >= 1"),
        ("nft.lora_targets=to_q", "nft.lora_targets: expected a list"),
        ("rollout=3", "rollout: expected a mapping"),
        ("novel.key=1", "novel: unknown key"),
        ("nft.reference_forwards=sideways", "nft.reference_forwards: expected learner | rollout"),
        ("group_size", "expected key=value"),
        ("eval.every=-1", "eval.every: expected an integer >= 0"),
        ("eval.every=2", None),  # the held-out evaluation during training
        ("data.eval_fraction=0", None),
    ],
)
def test_bad_values_name_the_key(override, message):
    if message is None:
        load_config(None, MINIMAL + [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, MINIMAL + [override])
    assert message in str(e.value)


def test_rollout_reference_forwards_need_lora():
    load_config(None, MINIMAL + ["nft.reference_forwards=rollout"])
    with pytest.raises(ConfigError, match="nft.reference_forwards"):
        load_config(None, MINIMAL + ["nft.reference_forwards=rollout", "nft.full_finetune=true"])


def test_cross_section_checks():
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, ["data.synthetic=8", "reward.judge.tiny=true"])
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, ["model.tiny=true", "reward.judge.tiny=true"])
    with pytest.raises(ConfigError, match="reward.judge.url"):
        load_config(None, ["model.tiny=true", "data.synthetic=8"])
    with pytest.raises(ConfigError, match="eval.every: expected 0 when data.eval_fraction is 0"):
        load_config(None, MINIMAL + ["eval.every=2", "data.eval_fraction=0"])
    with pytest.raises(ConfigError, match="reward.flow_weight"):
        load_config(None, MINIMAL + ["reward.flow_weight=0", "reward.judge_weight=0"])


def test_random_layers_names_the_model_alone():
    """`model.random_layers` stands for model.path like model.tiny does, and excludes both."""
    cfg = load_config(None, ["model.random_layers=2", "data.synthetic=8", "reward.judge_weight=0"])
    assert cfg.model.random_layers == 2 and not cfg.model.path and not cfg.model.tiny
    for extra in ("model.tiny=true", "model.path=/x"):
        with pytest.raises(ConfigError, match="model.random_layers: set one of"):
            load_config(None, ["model.random_layers=2", "data.synthetic=8", "reward.judge_weight=0", extra])
    with pytest.raises(ConfigError, match="model.random_layers"):
        load_config(None, DEMO + ["model.random_layers=2"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dict_round_trip():
    cfg = load_config(None, MINIMAL + ["nft.lora_targets=[to_q]"])
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_override_literal_parsing():
    assert parse_override("a.b=1.5e-3") == ("a.b", 1.5e-3)
    assert load_config(None, MINIMAL + ["nft.lr=1e-4"]).nft.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert parse_override("a.b=[x, y]") == ("a.b", ["x", "y"])
    assert parse_override("a.b=s3://bucket/x") == ("a.b", "s3://bucket/x")


def test_cli_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for key in ("rollout.group_size", "reward.flow.q", "nft.decay_schedule", "cluster.learner_ranks"):
        assert key in out


def test_cli_reports_config_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "rollout.group_size=0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "rollout.group_size" in err and "Traceback" not in err


def test_entries_end_a_run_with_one_line_and_a_status(capsys):
    """The entries' shared ending (motionnft_core/cli.py): a ConfigError found during the run ends as at load, a
    listed failure prints its label and status, anything else is a bug and keeps its traceback."""

    def fails(err: BaseException):
        def body() -> None:
            raise err

        return body

    stopped = (RuntimeError, "run stopped", 1)
    assert run_command(lambda: None, stopped) == 0
    assert run_command(fails(ConfigError("cluster.x: expected y")), stopped) == 2
    assert capsys.readouterr().err == "config error: cluster.x: expected y\n"
    assert run_command(fails(RuntimeError("judge outage")), (OSError, "error", 2), stopped) == 1
    assert capsys.readouterr().err == "run stopped: judge outage\n"
    assert run_command(fails(FileNotFoundError("no x")), ((KeyError, OSError), "error", 2), stopped) == 2
    assert capsys.readouterr().err == "error: no x\n"
    with pytest.raises(KeyError):
        run_command(fails(KeyError("bug")), stopped)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("reward.judge.backoff_s=-5", "reward.judge.backoff_s"),
        ("reward.judge.max_model_len=-1", "reward.judge.max_model_len"),
        ("reward.judge.image_format=gif", "reward.judge.image_format"),
        ("reward.judge.startup_timeout_s=0", "reward.judge.startup_timeout_s"),
        ("reward.judge.log_dir=logs", "reward.judge.log_dir"),  # used on the judge's node: relative to what?
        ("reward.flow.cache_size=-1", "reward.flow.cache_size"),
        ("demo.warmup=-1", "demo.warmup"),
        ("demo.grad_clip=0", "demo.grad_clip"),
    ],
)
def test_plain_class_settings_are_checked_at_load(override, key):
    """What the judge client, the vLLM server, the flow scorer and the warm start take from their config section
    fails at start-up naming the key, not later inside a worker."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, MINIMAL + [override])


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_formula_constants_default_to_the_config_defaults():
    """The pure formula functions keep the published constants (docs/algorithm.md) as keyword defaults (readable
    hand-computed tests); the run always passes the config's values, and these copies are pinned to the config here."""
    from learner.trainer.nft_loss import (
        ema_decay,
        group_filter,
        nft_loss,
        old_policy_decay,
        optimality,
        saturated_groups,
    )
    from rewards.flow_reward import motion_alignment_reward
    from rewards.flow_scorer import reward_constants

    n, f = NFTConfig(), FlowRewardConfig()
    assert _defaults(optimality)["clip"] == n.adv_clip_max
    assert _defaults(group_filter) == {"min_std": n.group_min_std, "max_mean": n.group_max_mean}
    assert _defaults(saturated_groups) == {"max_std": n.group_min_std, "min_mean": n.group_max_mean}
    loss = _defaults(nft_loss)
    assert (loss["beta"], loss["adv_clip_max"], loss["kl_weight"]) == (n.beta, n.adv_clip_max, n.kl_weight)
    assert _defaults(old_policy_decay)["schedule"] == n.decay_schedule
    assert _defaults(ema_decay)["cap"] == n.ema_cap
    reward = _defaults(motion_alignment_reward)
    assert {k: reward[k] for k in reward_constants(f)} == reward_constants(f)


DEMO = ["demo.enabled=true", "rollout.height=32", "rollout.width=32", "reward.judge_weight=0"]


def test_demo_needs_no_model_or_data_but_refuses_others():
    cfg = load_config(None, DEMO)
    assert cfg.demo.enabled and not cfg.model.path and not cfg.data.source
    for extra, key in (("model.path=/x", "model.path"), ("model.tiny=true", "model.tiny"),
                       ("data.source=/d.jsonl", "data.source"), ("data.synthetic=8", "data.synthetic"),
                       ("model.family=qwen_image_edit", "model.family"),
                       ("rollout.width=48", "rollout.width"), ("demo.motion=sideways", "demo.motion"),
                       ("demo.noop_fraction=1.0", "demo.noop_fraction")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            load_config(None, DEMO + [extra])


def test_logging_image_settings_are_checked():
    from motionnft_core.config import LoggingConfig

    for bad, key in (({"image_every": -1}, "logging.image_every"), ({"image_size": 4}, "logging.image_size")):
        with pytest.raises(ConfigError, match=key):
            LoggingConfig(**bad)


def test_print_config_builds_nothing(capsys):
    assert main(["--config", str(ROOT / "configs" / "learn_demo.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert '"enabled": true' in out and '"max_sequence_length": 48' in out


# ------------------------------------------------------------------------------------------------ failures

@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nft:\n  beta: 1.0\n  lr: 0.1\n  beta: 2.0\n", "nft.beta: duplicate key at line 4 of {path} (first at line 2"),
        ("model: {tiny: true}\nmodel: {family: qwen_image_edit}\n", "model: duplicate key at line 2 of {path}"),
        ("reward:\n  flow:\n    q: 0.4\n    q: 0.5\n", "reward.flow.q: duplicate key at line 4"),
        ("cluster:\n  node_types:\n    gpu: {GPU: 8, GPU: 4}\n", "cluster.node_types.gpu.GPU: duplicate key at line 3"),
    ],
)
def test_duplicate_yaml_keys_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, MINIMAL)
    assert message.format(path=path) in str(err.value)


def test_duplicate_keys_in_an_override_value_and_yaml_merges(tmp_path):
    with pytest.raises(ConfigError, match=r"^nft\.beta: duplicate key"):
        load_config(None, MINIMAL + ["nft={beta: 1, beta: 2}"])
    path = tmp_path / "run.yaml"  # a merge key's values may be overridden: that is what merges are for
    path.write_text("rollout: {<<: {group_size: 4, num_steps: 3}, group_size: 6}\n")
    cfg = load_config(path, MINIMAL)
    assert (cfg.rollout.group_size, cfg.rollout.num_steps) == (6, 3)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("nft.beta=.inf", "nft.beta"),
        ("nft.beta=-.inf", "nft.beta"),
        ("nft.beta=.nan", "nft.beta"),
        ("nft.beta=1e999", "nft.beta"),  # overflows to inf
        ("nft.lr=" + "9" * 400, "nft.lr"),  # an int beyond float range
        ("reward.judge.timeout_s=.inf", "reward.judge.timeout_s"),
        ("reward.max_wait_ms=.nan", "reward.max_wait_ms"),
        ("demo.weight_decay=.inf", "demo.weight_decay"),
        ("cluster.learner_resources={learner_node: .inf}", "cluster.learner_resources.learner_node"),
        ("cluster.node_types={gpu: {GPU: .nan}}", "cluster.node_types.gpu.GPU"),
    ],
)
def test_non_finite_floats_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, MINIMAL + [override])
    assert str(err.value).startswith(f"{key}: expected a finite number")


def test_non_finite_floats_are_refused_in_yaml_and_in_code(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("nft: {beta: .inf}\n")
    with pytest.raises(ConfigError, match=r"^nft\.beta: expected a finite number, got inf"):
        load_config(path, MINIMAL)
    with pytest.raises(ConfigError, match=r"^nft\.beta: expected a finite"):
        NFTConfig(beta=float("inf"))
    with pytest.raises(ConfigError, match=r"^reward\.flow\.tau: expected a finite"):
        FlowRewardConfig(tau=float("inf"))
    defaults = config_to_dict(Config())  # every default is finite (building them would have raised otherwise)
    floats = [v for section in defaults.values() for v in section.values() if isinstance(v, float)]
    assert floats and all(math.isfinite(v) for v in floats)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("checkpoint.dir=", "checkpoint.dir: expected a local dir or s3://bucket/prefix, not empty, got ''"),
        ("checkpoint.dir='  '", "checkpoint.dir: expected a local dir or s3://bucket/prefix, not empty"),
        ("checkpoint.dir=s3://", "checkpoint.dir: expected s3://bucket/prefix with a bucket name"),
        ("checkpoint.dir=s3:///ckpt", "checkpoint.dir: expected s3://bucket/prefix with a bucket name"),
        ("logging.dir=", "logging.dir: expected a local dir, not empty, got ''"),
        ("logging.dir=s3://bucket/run", "logging.dir: expected a local dir (not s3://"),
        ("checkpoint.s3_retries=-1", "checkpoint.s3_retries: expected an integer >= 0"),
        ("checkpoint.s3_backoff_s=-1", "checkpoint.s3_backoff_s: expected a value >= 0"),
        ("checkpoint.s3_backoff_s=.inf", "checkpoint.s3_backoff_s: expected a finite number"),
    ],
)
def test_bad_dirs_and_s3_retry_settings_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, MINIMAL + [override])
    assert message in str(err.value)


def test_s3_retry_settings_reach_the_s3_helpers():
    from motionnft_core.s3 import S3Retry

    cfg = load_config(None, MINIMAL + ["checkpoint.dir=s3://bucket/ckpt", "checkpoint.s3_retries=2"])
    assert S3Retry.from_config(cfg.checkpoint) == S3Retry(2, cfg.checkpoint.s3_backoff_s)


# ------------------------------------------------------------------------------------------------ declared bounds


@dataclasses.dataclass(frozen=True)
class _Planted(_Section):
    SECTION: ClassVar[str] = "planted.sub"
    count: int = _f(0, "a planted field", ge=0)
    share: float = _f(0.5, "another", gt=0, lt=1)


def test_a_planted_bound_rejects_naming_the_dotted_key():
    assert _Planted(count=0, share=0.25).count == 0
    with pytest.raises(ConfigError, match=r"^planted\.sub\.count: expected an integer >= 0, got -1$"):
        _Planted(count=-1)
    with pytest.raises(ConfigError, match=r"^planted\.sub\.share: expected a value in \(0, 1\), got 1\.0$"):
        _Planted(share=1.0)


def _sections(cls: type = Config) -> list[type]:
    """Every section class under `cls`, nested ones included."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [tp, *_sections(tp)]
    return out


def _outside(rule: Rule, integer: bool) -> Any:
    """A value the rule refuses: just past a bound, off the multiple, or no choice."""
    if rule.choices is not None:
        return 1 if isinstance(rule.choices[0], bool) else "no-such-choice"
    step = 1 if integer else 0.5
    if rule.multiple_of is not None:
        return (rule.ge or rule.multiple_of) + 1
    if rule.ge is not None:
        return rule.ge - step
    if rule.gt is not None:
        return rule.gt
    return rule.le + step if rule.le is not None else rule.lt


BOUNDED = [
    (cls, f)
    for cls in _sections()
    for f in dataclasses.fields(cls)
    if not isinstance(f.default, dict | tuple) and f.default is not dataclasses.MISSING
    and any(v is not None for v in (f.metadata["rule"].ge, f.metadata["rule"].gt, f.metadata["rule"].le,
                                    f.metadata["rule"].lt, f.metadata["rule"].choices))
]  # fmt: skip


@pytest.mark.parametrize(("cls", "f"), BOUNDED, ids=[f"{c.SECTION}.{f.name}" for c, f in BOUNDED])
def test_every_declared_bound_is_reported_with_its_key(cls, f):
    rule, integer = f.metadata["rule"], f.type == "int"
    bad = _outside(rule, integer)
    with pytest.raises(ConfigError) as err:
        cls(**{f.name: bad})
    assert str(err.value) == f"{cls.SECTION}.{f.name}: expected {rule.expectation(integer)}, got {bad!r}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.metrics_export_port=65536", "cluster.metrics_export_port: expected a port from 1 to 65535, or 0, "
                                              "got 65536"),
        ("eval.confidence=1", "eval.confidence: expected a value in (0, 1), got 1.0"),
        ("data.upscale_small=1", "data.upscale_small: expected true/false, got 1"),
        ("cluster.crash_window_s=0", "cluster.crash_window_s: expected seconds > 0, got 0.0"),
        ("rollout.parity_tolerance={float32: 0}", "rollout.parity_tolerance.float32: expected a number > 0, got 0.0"),
        ("rollout.parity_tolerance={float8: 1}", "rollout.parity_tolerance: expected keys among"),
        ("cluster.node_types={gpu: {GPU: -1}}", "cluster.node_types.gpu.GPU: expected a value >= 0, got -1.0"),
        ("nft.lora_targets=[]", "nft.lora_targets: expected a non-empty list of module names, got ()"),
        ("reward.judge.restart_backoff_max_s=-1", "reward.judge.restart_backoff_max_s: expected a value >= 0"),
        ("reward.judge.max_backoff_s=0.1", "reward.judge.max_backoff_s: expected a value >= reward.judge.backoff_s"),
        ("reward.judge.max_backoff_s=-1", "reward.judge.max_backoff_s: expected a value >= 0"),
    ],
)  # fmt: skip
def test_declared_bounds_through_overrides(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, MINIMAL + [override])
    assert str(err.value).startswith(message)


def test_upscale_small_refuses_a_non_bool_built_in_code():
    with pytest.raises(ConfigError, match=r"^data\.upscale_small: expected true \| false, got 1$"):
        DataConfig(upscale_small=1)


def _keys(section: Any, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """dotted key -> (type name, default) of every leaf key under `section`."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out |= _keys(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = (f.type, list(value) if isinstance(value, tuple) else value)
    return out


def test_help_lists_every_key_with_its_type_and_default():
    lines = describe()
    keys = _keys(Config())
    assert len(lines) == len(keys)
    for key, (tname, default) in keys.items():
        shown = [line for line in lines if line.startswith(f"  {key} (")]
        assert len(shown) == 1 and f"default {default!r}" in shown[0], key
        assert shown[0].startswith(f"  {key} ({tname.replace('typing.', '')}, "), key
