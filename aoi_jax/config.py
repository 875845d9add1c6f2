"""Experiment configuration: frozen dataclasses, small Python config files, command-line overrides.

A config file (``configs/*.py``) defines ``get_config() -> Config``. ``load(path, overrides)`` runs it (a
path, or a shipped config's name such as ``"ndigits"``) and applies ``KEY=VALUE`` overrides such as ``reg.alpha=0.004`` or ``model.channels=(8,16)``. Every
field is read somewhere and does what its comment says; an unknown key, a value of the wrong type or a value
outside its valid range is a ``KeyError``/``ValueError`` naming the key, the value and what is valid, raised
when the config is built, before any work (docs/semantics.md section 9.6).
"""

import ast
import dataclasses
import json
import logging
import math
import pathlib
import runpy
import typing
from typing import Any


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


def _check_range(key: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Raises ValueError "<key> must be in <interval>, got <value>" unless ``value`` is a finite number in the
    interval from ``low`` to ``high`` (each end closed unless ``*_open``; ``high = inf`` is always open and
    written ">= low" or "> low")."""
    above = value > low if low_open else value >= low
    below = value < high if high_open or high == math.inf else value <= high
    if not (math.isfinite(value) and above and below):
        if high == math.inf:
            interval = f"{'>' if low_open else '>='} {low:g}"
        else:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{key} must be {interval}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class NeuronConfig:
    """Spiking cell settings (docs/semantics.md section 2); stored with every checkpoint."""

    tau: float = 0.5  # leak multiplier in (0, 1]; 1.0 gives an IF cell
    vth: float = 1.0  # firing threshold
    reset: str = "hard"  # "hard" (to zero) or "soft" (subtract vth)
    surrogate: str = "triangle"  # surrogate gradient shape: triangle | sigmoid | arctan
    width: float = 1.0  # surrogate width g
    v0: float = 0.0  # initial membrane (IF conversion: half the threshold)
    # lif: tau fixed | plif: the leak learnt (SpikingJelly's ParametricLIFNode, decay_input=False, v_reset=0):
    # tau = 1 - sigmoid(w), w learnt, starting where tau = the value above (0.5 -> w = 0; needs tau < 1)
    kind: str = "lif"
    learn_vth: bool = False  # learn the threshold, starting at vth (aoi_jax.neurons.cell)
    per_channel: bool = False  # learnt parameters (plif's w, a learnt vth): one per channel, not one per layer

    def __post_init__(self):
        _check_choice("model.neuron.reset", self.reset, ("hard", "soft"))
        _check_choice("model.neuron.surrogate", self.surrogate, ("triangle", "sigmoid", "arctan"))
        if self.kind not in ("lif", "plif"):            # a cell a user registered in aoi_jax.neurons.CELLS
            from aoi_jax import neurons
            _check_choice("model.neuron.kind", self.kind, tuple(neurons.CELLS))
        if self.kind == "plif":
            _check_range("model.neuron.tau (the initial leak of kind 'plif')", self.tau, 0.0, 1.0,
                         low_open=True, high_open=True)
        _check_range("model.neuron.tau", self.tau, 0.0, 1.0, low_open=True)
        if self.per_channel and not (self.kind == "plif" or self.learn_vth):
            raise ValueError("model.neuron.per_channel needs a learnt parameter (kind='plif' or learn_vth=True), "
                             f"got kind={self.kind!r}, learn_vth={self.learn_vth!r}")
        _check_range("model.neuron.vth", self.vth, 0.0, low_open=True)
        _check_range("model.neuron.width", self.width, 0.0, low_open=True)
        if not math.isfinite(self.v0):
            raise ValueError(f"model.neuron.v0 must be a finite number, got {self.v0!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Network architecture; ``name`` resolves through ``aoi_jax.models.MODELS``."""

    name: str = "small_snn"  # small_snn | vggsnn | gesture_snn | resnet18 | resnet20 | vgg16
    channels: tuple[int, ...] = (16, 32, 64)  # small_snn only: conv widths, each + 2x2 avg-pool; others: ()
    num_classes: int = 10
    neuron: NeuronConfig = NeuronConfig()
    # lif: spiking cells of ``neuron`` (direct training) | qcfs: ANN with QCFS activations and a learnt
    # threshold lam per layer | if: the converted SNN, IF cells of threshold lam (aoi_jax/convert.py);
    # qcfs and if need neuron = IF in units of lam: tau=1, vth=1, reset="soft" (v0: start, 0.5 = lam / 2)
    activation: str = "lif"
    levels: int = 4  # QCFS quantisation steps L (activation == "qcfs"; 4 in the reference, also 8)
    tebn_steps: int = 0  # TEBN: BatchNorm followed by a learnt scale p_t for each of this many steps T; 0 = off
    # rematerialise in training: keep only each spiking layer's input for the backward pass and recompute its
    # conv, BatchNorm and cell there (fewer temporaries, more FLOPs; on XLA:CPU only with
    # xla_tuning.CPU_REMAT_OPTIONS: docs/performance.md)
    remat: bool = False

    @property
    def is_ann(self) -> bool:
        """A QCFS ANN (``activation == "qcfs"``): trained on one static frame per sample, then converted to an
        SNN of IF neurons (``aoi_jax.convert``) before it is evaluated. The one place that says so."""
        return self.activation == "qcfs"

    def __post_init__(self):
        _check_choice("model.activation", self.activation, ("lif", "qcfs", "if"))
        for i, c in enumerate(self.channels):
            _check_range(f"model.channels[{i}]", c, 1)
        _check_range("model.num_classes", self.num_classes, 2)
        _check_range("model.levels", self.levels, 1)
        _check_range("model.tebn_steps", self.tebn_steps, 0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data set and frame settings; ``name`` resolves through ``aoi_jax.data.DATASETS``."""

    name: str = "ndigits"
    # where raw data live and caches are written; "" = the default location, independent of the current
    # directory: $AOI_JAX_DATA if set, else $XDG_CACHE_HOME/aoi_jax (~/.cache/aoi_jax) (aoi_jax.data.data_root)
    data_dir: str = ""
    timesteps: int = 10  # T: equal time bins per recording
    seed: int = 0  # generator / split seed of the data set (independent of the training seed)
    size: tuple[int, ...] = ()  # (H, W) frame size after spatial downsampling; () keeps the sensor's
    translate: int = 0  # training augmentation: max random integer shift in px at the native resolution
    hflip: bool = False  # training augmentation: random horizontal flip
    cutout: int = 0  # CIFAR training augmentation: side in px of one random square zeroed (Cutout); 0 = off
    # event sets: the part of each recording that is binned, relative to its first event: () = all of it,
    # else (start_us, length_us): the T bins span [start, start + length], cut at the recording's last event
    window: tuple[int, ...] = ()
    # fraction of each class of the training split held out as a validation split (seeded by ``seed``,
    # ``aoi_jax.input_pipeline.split_validation``): never trained on; Top-K and SpikeCP calibrate on it when
    # eval.calibration = "validation"; 0 trains on the whole training split
    validation_fraction: float = 0.0

    def __post_init__(self):
        _check_range("data.timesteps", self.timesteps, 1)
        _check_range("data.seed", self.seed, 0)
        if len(self.size) not in (0, 2):
            raise ValueError(f"data.size must be () or (H, W), got {self.size!r}")
        for i, s in enumerate(self.size):
            _check_range(f"data.size[{i}]", s, 1)
        _check_range("data.translate", self.translate, 0)
        _check_range("data.cutout", self.cutout, 0)
        _check_range("data.validation_fraction", self.validation_fraction, 0.0, 1.0, high_open=True)
        w = tuple(self.window)
        if w != () and (len(w) != 2 or w[0] < 0 or w[1] <= 0):
            raise ValueError(f"data.window = {self.window!r} must be () (the whole recording) or "
                             "(start_us, length_us) with start_us >= 0 and length_us > 0")


@dataclasses.dataclass(frozen=True)
class RegConfig:
    """RCS regulariser (docs/semantics.md section 5)."""

    alpha: float = 0.002  # weight of rcs_loss in the total loss; 0 switches RCS off
    window: float = 0.3  # fraction of last steps averaged into the delayed target r_d
    rcs_n: float = 0.3  # fraction of last steps that must be correct for a sample to count

    def __post_init__(self):
        _check_range("reg.alpha", self.alpha, 0.0)
        _check_range("reg.window", self.window, 0.0, 1.0)
        _check_range("reg.rcs_n", self.rcs_n, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser (docs/semantics.md section 10)."""

    name: str = "sgd"  # sgd (with momentum) | adamw
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # sgd momentum (adamw: b1)
    weight_decay: float = 5e-4  # sgd: L2 added to the gradient; adamw: decoupled decay
    schedule: str = "cosine"  # cosine (decay to 0 over all steps) | constant

    def __post_init__(self):
        _check_choice("optim.name", self.name, ("sgd", "adamw"))
        _check_choice("optim.schedule", self.schedule, ("cosine", "constant"))
        _check_range("optim.lr", self.lr, 0.0, low_open=True)
        _check_range("optim.momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_range("optim.weight_decay", self.weight_decay, 0.0)


# the metrics train.best_metric may name (fields of each epoch's metrics record, aoi_jax.training) and
# which way is better: "max" or "min"
BEST_METRICS = {"val_accuracy": "max", "val_loss": "min", "train_accuracy": "max", "train_loss": "min"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training loop."""

    epochs: int = 20  # a finished run asked for more continues (README, Reliability)
    batch_size: int = 32  # at most the training set's size (checked once the data set is loaded)
    loss: str = "mean"  # mean (CE of the time-mean logits) | tet
    tet_lambda: float = 1e-3  # TET's MSE weight (used when loss == "tet")
    checkpoint_keep: int = 2  # the checkpoints of this many newest epochs are kept (and the best, best_metric)
    # "" (none) or a metric of BEST_METRICS (val_*: data.validation_fraction > 0): the checkpoint of the epoch
    # best by it is kept as well (accuracy: highest, loss: lowest; ``evaluate.py --step best``)
    best_metric: str = ""
    # stop after this many epochs without a new best best_metric (which it needs); 0 = never
    early_stop_patience: int = 0

    def __post_init__(self):
        _check_choice("train.loss", self.loss, ("mean", "tet"))
        _check_range("train.epochs", self.epochs, 1)
        _check_range("train.batch_size", self.batch_size, 1)
        _check_range("train.tet_lambda", self.tet_lambda, 0.0, 1.0)
        _check_range("train.checkpoint_keep", self.checkpoint_keep, 1)
        _check_choice("train.best_metric", self.best_metric, ("", *BEST_METRICS))
        _check_range("train.early_stop_patience", self.early_stop_patience, 0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Cutoff evaluation (docs/semantics.md sections 6-8)."""

    epsilons: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09)
    bins: int = 100  # Top-K threshold grid size
    min_support: int = 0  # Top-K: selected calibration samples a bin needs (0 = reference rule)
    # the split Top-K and SpikeCP calibrate on: "train" (the samples trained on; the reference's choice) or
    # "validation" (the held-out data.validation_fraction of the training split, which must then be > 0)
    calibration: str = "train"
    calib_dropout: float = 0.3  # dropout on spikes in the calibration pass, either split (0 switches it off)
    batch_size: int = 256  # evaluation batch size

    def __post_init__(self):
        _check_choice("eval.calibration", self.calibration, ("train", "validation"))
        if not self.epsilons:
            raise ValueError("eval.epsilons must hold at least one value in [0, 1), got ()")
        for i, e in enumerate(self.epsilons):
            _check_range(f"eval.epsilons[{i}]", e, 0.0, 1.0, high_open=True)
        _check_range("eval.bins", self.bins, 1)
        _check_range("eval.min_support", self.min_support, 0)
        _check_range("eval.calib_dropout", self.calib_dropout, 0.0, 1.0, high_open=True)
        _check_range("eval.batch_size", self.batch_size, 1)


def epsilon_index(epsilons, epsilon: float) -> int | None:
    """The index of ``epsilon`` in ``epsilons`` (e.g. a report's ``eval.epsilons``), equal within 1e-9; None if
    it is not there."""
    return next((i for i, e in enumerate(epsilons) if abs(e - epsilon) < 1e-9), None)


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole experiment."""

    seed: int = 0  # training seed: initialisation, shuffling, calibration dropout
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    reg: RegConfig = RegConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        _check_range("seed", self.seed, 0)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config dataclass, e.g. ``['seed', 'model.name', ...]``."""
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Converts ``value`` to type ``tp`` or raises ValueError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (elem, _) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"config key {key!r} expects a tuple, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} expects a bool (True/False), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"config key {key!r} expects a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key {key!r} expects a string, got {value!r}")
    raise TypeError(f"config key {key!r} has unsupported type {tp}")


def _parse_literal(text: str) -> Any:
    """Parses a command-line value: a Python literal, else the bare string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


SWEEP_KEYS = ("seed", "reg.alpha", "train.tet_lambda")  # keys a sweep may vary: the seed and step.WEIGHT_KEYS


def parse_sweep(items: typing.Iterable[str]) -> dict[str, tuple]:
    """Parses ``KEY=V1,V2,...`` strings (``train.py --sweep``) into {key: (values...)}, in the order given.

    Values are Python literals (``0``, ``1e-3``); their types are checked when the members are built
    (``aoi_jax.sweep.members``). Only ``SWEEP_KEYS`` may be swept: they do not change the compiled program.

    Raises:
      ValueError: an item is not KEY=V1,V2,..., a key is given twice, or a key repeats a value.
      KeyError: a key that cannot be swept in one program; the message names it and lists ``SWEEP_KEYS``.
    """
    sweep = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ValueError(f"sweep {item!r} is not of the form KEY=V1,V2,...")
        if key not in SWEEP_KEYS:
            raise KeyError(f"config key {key!r} cannot be swept in one compiled program (it changes the "
                           f"program or is not a config key); supported sweep keys: {', '.join(SWEEP_KEYS)}")
        if key in sweep:
            raise ValueError(f"sweep key {key!r} given twice")
        values = tuple(_parse_literal(v.strip()) for v in text.split(","))
        if len(set(values)) != len(values):
            raise ValueError(f"sweep {key!r} repeats a value: {values}")
        sweep[key] = values
    return sweep


def override(cfg: Config, key: str, value: Any) -> Config:
    """Returns ``cfg`` with the dotted ``key`` set to ``value`` (type-checked).

    Raises:
      KeyError: ``key`` is not a config key; the message lists the valid keys.
      ValueError: ``value`` has the wrong type or an invalid choice.
    """
    return _set(cfg, key.split("."), value, key, type(cfg))


def _set(obj, parts: list[str], value: Any, key: str, root) -> Any:
    types_ = _field_types(type(obj))
    head = parts[0]
    if head not in types_ or (len(parts) > 1 and not dataclasses.is_dataclass(types_[head])):
        raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(root))}")
    tp = types_[head]
    if dataclasses.is_dataclass(tp):
        if len(parts) == 1:
            raise KeyError(f"config key {key!r} is a group; set one of its fields: "
                           f"{', '.join(k for k in valid_keys(root) if k.startswith(key + '.'))}")
        return dataclasses.replace(obj, **{head: _set(getattr(obj, head), parts[1:], value, key, root)})
    return dataclasses.replace(obj, **{head: _coerce(key, value, tp)})


def apply_overrides(cfg: Config, overrides: typing.Iterable[str] = ()) -> Config:
    """Applies ``KEY=VALUE`` strings in order, e.g. ``["reg.alpha=0.004", "train.epochs=2"]``."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form KEY=VALUE")
        cfg = override(cfg, key.strip(), _parse_literal(text.strip()))
    return cfg


def shipped() -> dict[str, pathlib.Path]:
    """The configs that come with aoi-jax, by name: ``{"ndigits": .../ndigits.py, ...}``.

    They are the files ``configs/*.py`` of the repository, installed as the package ``aoi_jax.configs``
    (``setup.cfg``): that folder when it exists (an installed wheel), else ``configs/`` beside the
    ``aoi_jax`` folder (a checkout or an editable install).
    """
    package = pathlib.Path(__file__).resolve().parent
    folder = package / "configs" if (package / "configs").is_dir() else package.parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def load(path: str | pathlib.Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Runs the config file ``path`` (its ``get_config()``), then applies ``overrides``. ``path`` is a file, or
    the name of a shipped config (``"ndigits"``, ``shipped()``) when no such file exists.

    Raises:
      FileNotFoundError: neither a file nor a shipped name (the message lists the names).
      ValueError: the file defines no ``get_config`` returning a Config.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        names = shipped()
        if str(path) not in names:
            raise FileNotFoundError(f"config file {str(path)!r} does not exist, nor is it the name of a shipped "
                                    f"config: {sorted(names)}")
        path = names[str(path)]
    namespace = runpy.run_path(str(path))
    if "get_config" not in namespace:
        raise ValueError(f"config file {str(path)!r} defines no get_config()")
    cfg = namespace["get_config"]()
    if not isinstance(cfg, Config):
        raise ValueError(f"get_config() in {str(path)!r} returned {type(cfg).__name__}, expected Config")
    return apply_overrides(cfg, overrides)


def differences(stored: Config, requested: Config) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, requested value)`` for every dotted leaf key whose values differ, in the order
    of ``valid_keys``."""
    out = []
    for key in valid_keys(type(stored)):
        a, b = stored, requested
        for part in key.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if a != b:
            out.append((key, a, b))
    return out


def to_dict(cfg) -> dict[str, Any]:
    """Plain nested dict (tuples become lists), for JSON."""
    return json.loads(to_json(cfg))


def to_json(cfg) -> str:
    """Strict JSON of ``cfg`` (the range checks keep every number finite)."""
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True, allow_nan=False)


def from_dict(d: dict[str, Any], cls=Config, prefix: str = "", *, defaulted: list | None = None):
    """Inverse of ``to_dict``; strict: an unknown or missing key raises KeyError naming it.

    Args:
      defaulted: for a config stored by an earlier version (a checkpoint's): a missing key then takes its
        default (what that version did: every key added since defaults to the earlier behaviour) and its
        dotted name is appended to this list. Unknown keys are still refused.
    """
    types_ = _field_types(cls)
    unknown = sorted(set(d) - set(types_))
    if unknown:
        raise KeyError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                       f"valid keys: {', '.join(valid_keys(cls, prefix))}")
    missing = sorted(set(types_) - set(d))
    if missing and defaulted is None:
        raise KeyError(f"config is missing key(s) {[prefix + k for k in missing]}")
    kwargs = {}
    for name, tp in types_.items():
        if name in missing:
            defaulted.extend(valid_keys(tp, prefix + name + ".") if dataclasses.is_dataclass(tp)
                             else [prefix + name])
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(d[name], tp, prefix + name + ".", defaulted=defaulted)
        else:
            kwargs[name] = _coerce(prefix + name, d[name], tp)
    return cls(**kwargs)


def from_stored(d: dict[str, Any], where: str):
    """A config stored by this or an earlier version (a checkpoint's): ``from_dict`` with the keys added
    since taking their defaults, logged once naming them and ``where`` the config came from."""
    defaulted = []
    cfg = from_dict(d, defaulted=defaulted)
    if defaulted:
        logging.getLogger("aoi_jax").info("%s was stored before config key(s) %s existed: they take their defaults",
                                          where, ", ".join(defaulted))
    return cfg


__all__ = [
    "Config", "ModelConfig", "NeuronConfig", "DataConfig", "RegConfig", "OptimConfig", "TrainConfig",
    "EvalConfig", "shipped", "load", "override", "apply_overrides", "valid_keys", "differences", "to_dict", "to_json",
    "from_dict", "from_stored", "epsilon_index", "parse_sweep", "SWEEP_KEYS", "BEST_METRICS",
]
