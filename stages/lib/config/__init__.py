"""Typed configs: dataclasses registered in Hydra's ConfigStore, composed from ``conf/``.

Every stage composes the same tree (``conf/base.yaml``): ``student``/``teacher``/``ref`` (one
``model`` group in three roles), ``data``, ``rollout``, ``score``, ``select``, ``loss``, ``train``,
``eval``, ``sft``, ``report``, ``pipeline`` and ``experiment`` files that pin whole runs. The
config is closed: an unknown key fails at compose time in every form (``key=``, ``+key=``,
``++key=``), and every group checks its values in ``__post_init__`` (finite numbers, known loss
names and loss arguments, safe names for everything that becomes a path), so a bad value is one
``error:`` line before any model loads. Library code receives the typed ``Config``
(``OmegaConf.to_object``), never a raw dict, so it does not need ``cfg.get("k", default)``.

There is one way to build a config: :func:`compose` (what the command line does, see
``stages/lib/entry.py``). Configs the pipeline derives (variants, rounds, the SFT training) are
composed again from the same primary config and overrides plus a few more (:func:`derive`), so
they follow exactly the command line's rules; their names are computed here, in one place.
"""

# The package's public names: import them from ``stages.lib.config``. Where each lives:
# schema.py (the data stages' groups), training.py (the training groups), root.py (``Config`` and the pipeline's keys), checks.py
# (value checks), keys.py (the closed schema), compose.py (composition and derived configs).
from stages.lib.config.checks import check_loss_term, loss_arguments
from stages.lib.config.compose import (
    SFT_OVERRIDES,
    absolute_dirs,
    as_dict,
    compose,
    compose_dict,
    derive,
    hydra_arg_parser,
    quote,
    round_config,
    round_name,
    sft_config,
    to_config,
    variant_config,
)
from stages.lib.config.keys import check_override_keys, is_config_group, unknown_key_error
from stages.lib.config.root import (
    ADAPTIVE_METRICS,
    AdaptiveConfig,
    Config,
    PipelineConfig,
    Source,
    TrainVariant,
    register,
)
from stages.lib.config.schema import (
    CONF_DIR,
    LAUNCHERS,
    POLICY_DIR,
    ROUTE_COLUMNS,
    STAGES,
    DataConfig,
    EvalConfig,
    LauncherConfig,
    ModelConfig,
    ReportConfig,
    RolloutConfig,
    RouteBy,
    ScoreConfig,
    SelectConfig,
    SelectRule,
    WorkerConfig,
)
from stages.lib.config.training import (
    PRECISIONS,
    TRACKERS,
    LoraConfig,
    LossConfig,
    LossTerm,
    SftConfig,
    TrainConfig,
)

__all__ = [
    "ADAPTIVE_METRICS",
    "CONF_DIR",
    "LAUNCHERS",
    "POLICY_DIR",
    "PRECISIONS",
    "ROUTE_COLUMNS",
    "SFT_OVERRIDES",
    "STAGES",
    "TRACKERS",
    "AdaptiveConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LauncherConfig",
    "LoraConfig",
    "LossConfig",
    "LossTerm",
    "ModelConfig",
    "PipelineConfig",
    "ReportConfig",
    "RolloutConfig",
    "RouteBy",
    "ScoreConfig",
    "SelectConfig",
    "SelectRule",
    "SftConfig",
    "Source",
    "TrainConfig",
    "TrainVariant",
    "WorkerConfig",
    "absolute_dirs",
    "as_dict",
    "check_loss_term",
    "check_override_keys",
    "compose",
    "compose_dict",
    "derive",
    "hydra_arg_parser",
    "is_config_group",
    "loss_arguments",
    "quote",
    "register",
    "round_config",
    "round_name",
    "sft_config",
    "to_config",
    "unknown_key_error",
    "variant_config",
]
