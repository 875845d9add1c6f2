"""Spiking networks: NNX Conv/BatchNorm/Linear on the folded (T*N, ...) batch, cells scanned in between.

reference-semantics.md sections 1 and 10. Every model maps time-major frames ``(T, N, H, W, C)`` to
``(logits (T, N, K), layers)``, where ``layers`` is a tuple with one ``(spikes, membranes)`` pair per
spiking layer, each ``(T, N, ...)``: the regulariser reads them from the return value, never via hooks.
Each model's ``fan_out`` gives, per spiking layer, the synapses one spike of an interior unit drives in
the next layer (k*k*C_out for a following conv, the width of a following Linear); synaptic operations are
spikes times fan-out (reference-semantics.md section 9 item 3; border effects are ignored).

Calibration (reference-semantics.md section 7) runs the forward pass with inverted dropout of rate
``dropout`` on every spiking layer's output; it draws from the explicit ``key``.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from aoi_jax import neurons
from aoi_jax.config import ModelConfig, NeuronConfig

_kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin, cout, kernel, stride, padding, rngs):
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                    padding=padding if isinstance(padding, str) else [(padding, padding)] * 2,
                    kernel_init=_kaiming_fan_out, rngs=rngs)


def _bn(c, rngs):
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)  # PyTorch momentum 0.1


def _avg_pool(h):
    return nnx.avg_pool(h, (2, 2), strides=(2, 2))


def _max_pool(h):
    return nnx.max_pool(h, (2, 2), strides=(2, 2))


def spiking(u, T, neuron: NeuronConfig, *, dropout=0.0, key=None):
    """Runs the cell of ``neuron`` over time on a folded pre-activation.

    Args:
      u: pre-activation on the folded batch, (T*N, ...).  T: number of time steps.
      neuron: cell settings.  dropout: inverted-dropout rate on the spikes (0 = none).
      key: PRNG key, required when dropout > 0.
    Returns:
      (h, (spikes, membranes)): h = the (possibly dropped-out) spikes folded back to (T*N, ...);
      spikes and membranes (T, N, ...) as returned by ``neurons.lif``.
    Raises:
      ValueError: dropout > 0 without a key.
    """
    x = u.reshape(T, u.shape[0] // T, *u.shape[1:])
    s, m = neurons.lif(x, tau=neuron.tau, vth=neuron.vth, reset=neuron.reset, v0=neuron.v0,
                       surrogate=neuron.surrogate, width=neuron.width)
    h = s
    if dropout > 0.0:
        if key is None:
            raise ValueError("dropout > 0 needs a PRNG key")
        keep = jax.random.bernoulli(key, 1.0 - dropout, s.shape)
        h = jnp.where(keep, s / (1.0 - dropout), 0.0)
    return h.reshape(u.shape), (s, m)


class SpikingNet(nnx.Module):
    """Base of the models: one ``forward`` per architecture, run multistep or one step at a time.

    A subclass sets ``neuron`` and ``fan_out`` and defines ``forward(h, cell, *, train)``: the layers on
    a folded batch ``h`` (B, H, W, C), calling ``cell(i, u)`` on the pre-activation of spiking layer i
    and continuing with what it returns. ``__call__`` runs it on (T*N, ...) with ``cell`` scanning the
    LIF cell over time; ``step`` runs it on one frame with ``cell`` advancing carried membranes by one
    ``neurons.lif_step``. Both give the same spikes (a feed-forward net is exact in either order).
    """

    def __call__(self, x, *, train=False, dropout=0.0, key=None):
        """x: (T, N, H, W, C) -> (logits (T, N, K), ((spikes, membranes), ...) each (T, N, ...))."""
        if x.ndim != 5:
            raise ValueError(f"expected frames (T, N, H, W, C), got shape {x.shape}")
        T, N = x.shape[:2]
        keys = [None] * len(self.fan_out) if dropout == 0.0 or key is None \
            else list(jax.random.split(key, len(self.fan_out)))
        layers = []

        def cell(i, u):
            h, sm = spiking(u, T, self.neuron, dropout=dropout, key=keys[i])
            layers.append(sm)
            return h

        logits = self.forward(x.reshape(T * N, *x.shape[2:]), cell, train=train)
        return logits.reshape(T, N, -1), tuple(layers)

    def init_membranes(self, frame_shape):
        """Initial carried membranes for ``step``: one (N, ...) array per spiking layer, filled with v0.

        Args:
          frame_shape: (N, H, W, C) of one input frame.
        """
        shapes = jax.eval_shape(lambda: self(jnp.zeros((1, *frame_shape)))[1])
        return tuple(jnp.full(m.shape[1:], self.neuron.v0, m.dtype) for _, m in shapes)

    def step(self, membranes, frame):
        """One time step (evaluation mode): ``(membranes, frame (N, H, W, C)) -> (membranes, logits (N, K),
        spikes)``, where ``spikes`` holds each layer's spike count per sample, (L, N)."""
        n = self.neuron
        new, counts = [], []

        def cell(i, u):
            v, s, _ = neurons.lif_step(membranes[i], u, tau=n.tau, vth=n.vth, reset=n.reset,
                                       surrogate=n.surrogate, width=n.width)
            new.append(v)
            counts.append(s.reshape(s.shape[0], -1).sum(-1))
            return s

        logits = self.forward(frame, cell, train=False)
        return tuple(new), logits, jnp.stack(counts)


class SmallSNN(SpikingNet):
    """A small conv SNN for 34x34 event frames (N-Digits, N-MNIST).

    Each stage: Conv 3x3 -> BatchNorm -> LIF -> 2x2 average pool; then Linear on the flattened map.
    """

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        H, W, C = input_shape
        self.neuron = cfg.neuron
        chans = (C, *cfg.channels)
        self.convs = nnx.List([_conv(a, b, 3, 1, 1, rngs) for a, b in zip(chans[:-1], chans[1:])])
        self.norms = nnx.List([_bn(b, rngs) for b in chans[1:]])
        for _ in cfg.channels:
            H, W = H // 2, W // 2
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for {len(cfg.channels)} pooling stages")
        self.head = nnx.Linear(H * W * chans[-1], cfg.num_classes, rngs=rngs)
        self.fan_out = tuple(9 * c for c in cfg.channels[1:]) + (cfg.num_classes,)

    def forward(self, h, cell, *, train):
        for i, (conv, bn) in enumerate(zip(self.convs, self.norms)):
            h = _avg_pool(cell(i, bn(conv(h), use_running_average=not train)))
        return self.head(h.reshape(h.shape[0], -1))


VGG_PLAN = (64, 128, "P", 256, 256, "P", 512, 512, "P", 512, 512, "P")


class VGGSNN(SpikingNet):
    """The reference's VGGSNN (CIFAR10-DVS, N-Caltech101), reference-semantics.md section 10.

    Conv(C->64, k8, s4, p3) then 3x3 convs 64,128,P,256,256,P,512,512,P,512,512,P (P = 2x2 average
    pool), each conv followed by BatchNorm and LIF; Linear(512*h*w, K) on the flattened map (2x2 for
    128x128 input, 2x3 for 180x240).
    """

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        H, W, C = input_shape
        self.neuron = cfg.neuron
        convs, norms = [_conv(C, 64, 8, 4, 3, rngs)], [_bn(64, rngs)]
        H, W, cin = (H + 6 - 8) // 4 + 1, (W + 6 - 8) // 4 + 1, 64
        for item in VGG_PLAN:
            if item == "P":
                H, W = H // 2, W // 2
            else:
                convs.append(_conv(cin, item, 3, 1, 1, rngs))
                norms.append(_bn(item, rngs))
                cin = item
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for VGGSNN")
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.head = nnx.Linear(H * W * cin, cfg.num_classes, rngs=rngs)
        self.fan_out = tuple(9 * c for c in VGG_PLAN if c != "P") + (cfg.num_classes,)

    def forward(self, h, cell, *, train):
        h = cell(0, self.norms[0](self.convs[0](h), use_running_average=not train))
        i = 1
        for item in VGG_PLAN:
            if item == "P":
                h = _avg_pool(h)
            else:
                h = cell(i, self.norms[i](self.convs[i](h), use_running_average=not train))
                i += 1
        return self.head(h.reshape(h.shape[0], -1))


class GestureSNN(SpikingNet):
    """The reference's VGG-like DVS128 Gesture net (``VGG_Gesture``) with LIF cells.

    Conv(C->64, k4, s4, valid), Conv 64->128, then four times [2x2 max pool, Conv 128->128], a last
    max pool, each conv followed by BatchNorm and LIF; Linear(128*h*w, 512) + BatchNorm + LIF;
    Linear(512, K). For 128x128 input the map before the first Linear is 1x1.
    """

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        H, W, C = input_shape
        self.neuron = cfg.neuron
        self.convs = nnx.List([_conv(C, 64, 4, 4, "VALID", rngs), _conv(64, 128, 3, 1, 1, rngs)]
                              + [_conv(128, 128, 3, 1, 1, rngs) for _ in range(4)])
        self.norms = nnx.List([_bn(64, rngs), _bn(128, rngs)] + [_bn(128, rngs) for _ in range(4)])
        H, W = H // 4 // 32, W // 4 // 32
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for GestureSNN (needs at least 128x128)")
        self.fc = nnx.Linear(128 * H * W, 512, rngs=rngs)
        self.fc_norm = _bn(512, rngs)
        self.head = nnx.Linear(512, cfg.num_classes, rngs=rngs)
        self.fan_out = (9 * 128,) * 5 + (512, cfg.num_classes)

    def forward(self, h, cell, *, train):
        for i, (conv, bn) in enumerate(zip(self.convs, self.norms)):
            if i >= 2:
                h = _max_pool(h)
            h = cell(i, bn(conv(h), use_running_average=not train))
        h = _max_pool(h)
        h = cell(len(self.convs), self.fc_norm(self.fc(h.reshape(h.shape[0], -1)), use_running_average=not train))
        return self.head(h)


MODELS = {"small_snn": SmallSNN, "vggsnn": VGGSNN, "gesture_snn": GestureSNN}


def build(cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named ``cfg.name`` for per-step frames of ``input_shape = (H, W, C)``.

    Raises:
      ValueError: unknown model name (the message lists the valid ones).
    """
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model.name {cfg.name!r}; valid: {sorted(MODELS)}")
    if cfg.name != "small_snn" and cfg.channels:
        raise ValueError(f"model.channels is only read by small_snn; {cfg.name} has a fixed plan, "
                         f"set model.channels=() (got {cfg.channels})")
    if cfg.name == "small_snn" and not cfg.channels:
        raise ValueError("small_snn needs at least one conv width in model.channels")
    return MODELS[cfg.name](cfg, tuple(input_shape), rngs=rngs)


def with_neuron(cfg: ModelConfig, **changes) -> ModelConfig:
    """``cfg`` with neuron fields replaced, e.g. ``with_neuron(cfg, reset="soft")``."""
    return dataclasses.replace(cfg, neuron=dataclasses.replace(cfg.neuron, **changes))
