"""The training method of a run: the one place that knows a directly trained SNN from a QCFS ANN.

docs/semantics.md sections 3, 4 and 5. ``of(cfg)`` gives the run's ``Method``; everything that differs
between the two methods is a field of it, so no other module branches on ``ModelConfig.activation``::

    direct SNN (activation lif, or if)   input: all T frames     RCS per layer: rcs_scores(s, m)
                                          evaluated as trained
    QCFS ANN   (activation qcfs)          input: the first frame  RCS per layer: rcs_ann_scores(u)  (pre-activation)
                                          evaluated as the IF SNN it converts to (aoi_jax.convert)

Both losses are ``task_loss(logits) + alpha * rcs_loss(scores (L, N), logits, labels)`` (``step.loss_fn``);
for the ANN the logits are one time step, (1, N, K), so the task loss is plain cross-entropy and RCS's
correctness mask reads the ANN's own prediction.
"""

import dataclasses
import functools
from collections.abc import Callable

from aoi_jax import convert, regularisers
from aoi_jax.config import Config
from aoi_jax.data import FrameSet


@dataclasses.dataclass(frozen=True)
class Method:
    """How a run trains and what is evaluated.

    name: "direct" | "qcfs".  converts: the trained model is a QCFS ANN, evaluated as its IF SNN.
    timesteps: the frames per sample the model trains on (None: all of them).
    """

    name: str
    converts: bool
    timesteps: int | None

    def model_input(self, frameset: FrameSet) -> FrameSet:
        """What the model trains on: the frame set, or its first ``timesteps`` steps, (N, timesteps, H, W, C)."""
        if self.timesteps is None:
            return frameset
        return dataclasses.replace(frameset, frames=frameset.frames[:, :self.timesteps])

    def check_batch(self, frames) -> None:
        """Raises ValueError unless ``frames`` (T, N, H, W, C) has the method's number of steps."""
        if self.timesteps is not None and frames.shape[0] != self.timesteps:
            raise ValueError(f"the {self.name} method sees one static frame: frames must be (1, N, H, W, C), "
                             f"got {frames.shape}")

    def layer_score(self, cfg: Config) -> Callable:
        """RCS's per-sample score of one layer from its pair ``(a, b)`` (T, N, ...) -> (N,): spikes and
        membranes (``regularisers.rcs_scores``), or a QCFS layer's pre-activation (``rcs_ann_scores``)."""
        if self.converts:
            return _ann_score
        return functools.partial(regularisers.rcs_scores, vth=cfg.model.neuron.vth, window=cfg.reg.window)

    def evaluated(self, graphdef, state, cfg: Config, input_shape):
        """``(graphdef, state, cfg)`` of the network that is evaluated: the run itself, or the IF SNN the QCFS
        ANN converts to (``convert.to_snn``: the same parameters, activation "if")."""
        if not self.converts:
            return graphdef, state, cfg
        return convert.to_snn(state, cfg, input_shape)


def _ann_score(activations, preactivations):
    """``rcs_ann_scores`` of a QCFS layer's pre-activation, (1, N, ...) -> (N,)."""
    return regularisers.rcs_ann_scores(preactivations[0])


DIRECT = Method("direct", converts=False, timesteps=None)
QCFS = Method("qcfs", converts=True, timesteps=1)


def of(cfg: Config) -> Method:
    """The method of a run: ``QCFS`` for a QCFS ANN (``ModelConfig.is_ann``), else ``DIRECT``."""
    return QCFS if cfg.model.is_ann else DIRECT
