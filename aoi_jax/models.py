"""Spiking networks: NNX Conv/BatchNorm/Linear on the folded (T*N, ...) batch, cells scanned in between.

reference-semantics.md sections 1 and 10. Every model maps time-major frames ``(T, N, H, W, C)`` to
``(logits (T, N, K), layers)``, where ``layers`` is a tuple with one ``(spikes, membranes)`` pair per
spiking layer, each ``(T, N, ...)``: the regulariser reads them from the return value, never via hooks.
Each model's ``fan_out`` gives, per spiking layer, the synapses one spike of an interior unit drives in
the next layer (k*k*C_out for a following conv, the width of a following Linear); synaptic operations are
spikes times fan-out (reference-semantics.md section 9 item 3; border effects are ignored).

Calibration (reference-semantics.md section 7) runs the forward pass with inverted dropout of rate
``dropout`` on every spiking layer's output; it draws from the explicit ``key``.

``ModelConfig.activation`` picks what sits at each spiking layer of the same architecture (one forward):
``"lif"`` the cells of ``ModelConfig.neuron`` (direct training); ``"qcfs"`` the QCFS activation of an ANN
with a learnt threshold ``lam_l`` per layer (``aoi_jax.qcfs``); ``"if"`` the converted SNN, IF cells of
threshold ``lam_l`` emitting ``lam_l`` per spike (``aoi_jax.convert``). ``ModelConfig.tebn_steps > 0``
follows every conv BatchNorm by TEBN's per-timestep scale (``TEBatchNorm``).

Adding an architecture: subclass ``SpikingNet``; in ``__init__`` create the NNX modules and end with
``super().__init__(cfg, fan_out)``, ``fan_out`` holding one entry per spiking layer (as above); write
``forward(h, layer, norm)`` once, on a folded batch ``h`` (B, H, W, C), returning the logits (B, K); add
the class to ``MODELS``. ``forward`` calls ``h = layer(pre, x, *modules, post=None)`` once per spiking
layer, in order. The layer's pre-activation is ``u = pre(x, *modules)``: ``pre`` reaches its NNX modules
only through ``modules`` (so remat can recompute and differentiate them) and sends each BatchNorm through
``norm(bn, u)`` (batch or running statistics; TEBN's scale). ``layer`` runs on u the cell that
``ModelConfig.activation`` selects and returns ``post(its output)`` (``post``: e.g. the pooling after the
cell; it runs inside the layer, so remat recomputes it too). This one ``forward`` serves training
(``__call__``: the cells scanned over T), calibration dropout, remat, QCFS / IF conversion (set
``CONVERTIBLE = False`` if the model max-pools) and ``step`` (one frame at a time). ``model.channels`` is
small_snn's: other models set it to ``()``. The complete example (the README shows it too)::

    from flax import nnx

    from aoi_jax import models
    from aoi_jax.config import ModelConfig


    class TinySNN(models.SpikingNet):
        # Conv 3x3 (C -> 8), BatchNorm, cell, 2x2 average pool; Conv 3x3 (8 -> 16), BatchNorm, cell;
        # Linear(16 * H/2 * W/2, K)
        def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
            H, W, C = input_shape
            self.conv1, self.bn1 = nnx.Conv(C, 8, (3, 3), padding=1, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
            self.conv2, self.bn2 = nnx.Conv(8, 16, (3, 3), padding=1, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
            self.head = nnx.Linear(16 * (H // 2) * (W // 2), cfg.num_classes, rngs=rngs)
            # a spike of layer 0 reaches 3 x 3 x 16 synapses of conv2, one of layer 1 the head's K
            super().__init__(cfg, fan_out=(9 * 16, cfg.num_classes))

        def forward(self, h, layer, norm):
            conv_bn = lambda x, conv, bn: norm(bn, conv(x))
            h = layer(conv_bn, h, self.conv1, self.bn1, post=models.avg_pool)
            h = layer(conv_bn, h, self.conv2, self.bn2)
            return self.head(h.reshape(h.shape[0], -1))


    models.MODELS["tiny_snn"] = TinySNN
    model = models.build(ModelConfig(name="tiny_snn", channels=(), num_classes=3), (8, 8, 2), rngs=nnx.Rngs(0))
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from aoi_jax import neurons, qcfs
from aoi_jax.config import ModelConfig, NeuronConfig

_kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin, cout, kernel, stride, padding, rngs, *, use_bias=True):
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                    padding=padding if isinstance(padding, str) else [(padding, padding)] * 2,
                    use_bias=use_bias, kernel_init=_kaiming_fan_out, rngs=rngs)


class TEBatchNorm(nnx.BatchNorm):
    """BatchNorm followed by TEBN's learnt per-timestep scale (reference-semantics.md section 4).

    The reference's ``TEBNLayer``: BatchNorm3d over (N, C, T, H, W), i.e. statistics per channel over
    (N, T, H, W), then ``y_t * p_t`` with one scalar ``p_t`` per time step, initialised to 1::

        y   = gamma * (u - mean) / sqrt(var + eps) + beta      # mean, var over (T*N, H, W): all steps
        out = p_t * y_t

    On the folded (T*N, ...) batch plain BatchNorm already takes its statistics over time, so only the
    scale is new. ``__call__`` is ``nnx.BatchNorm``'s; the models apply ``scale_time`` after it.
    """

    def __init__(self, num_features, timesteps, *, rngs: nnx.Rngs):
        super().__init__(num_features, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.time_scale = nnx.Param(jnp.ones((timesteps,), jnp.float32))

    def scale_time(self, y, *, T=None, t=None):
        """``p_t * y``: on a folded batch (T*N, ...) given ``T``, or on one step's (N, ...) given ``t``, a
        step index shared by the batch (scalar) or one per sample ((N,): continuous batching).

        Raises:
          ValueError: neither or both of T and t given, or T differs from the number of scales.
        """
        p = self.time_scale[...]
        if (T is None) == (t is None):
            raise ValueError("TEBN scales each time step by p_t: give T (folded batch) or t (one step)")
        if t is not None:
            t = jnp.asarray(t)
            return y * p[t].reshape(t.shape + (1,) * (y.ndim - t.ndim))
        if T != p.shape[0]:
            raise ValueError(f"TEBN has {p.shape[0]} per-timestep scales (model.tebn_steps) but the input "
                             f"has T = {T} steps")
        x = y.reshape(T, y.shape[0] // T, *y.shape[1:])
        return (x * p.reshape(T, *(1,) * (x.ndim - 1))).reshape(y.shape)


def _bn(c, rngs, tebn_steps=0):
    """BatchNorm (PyTorch momentum 0.1), or ``TEBatchNorm`` when ``tebn_steps > 0``."""
    if tebn_steps:
        return TEBatchNorm(c, tebn_steps, rngs=rngs)
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)


def avg_pool(h):
    """2x2 average pooling, stride 2, of (B, H, W, C) (an odd last row or column is dropped), as a reshape
    and a mean: its gradient is a broadcast that XLA fuses into its consumer, where ``nnx.avg_pool``'s
    (a padded ``reduce_window``) is a (B, H, W, C) buffer of its own."""
    B, H, W, C = h.shape
    h = h[:, :H - H % 2, :W - W % 2]
    return h.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))


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
    return _dropout(s, dropout, key).reshape(u.shape), (s, m)


def _dropout(h, rate, key):
    """Inverted dropout: each entry kept with probability 1 - rate and scaled by 1 / (1 - rate)."""
    if rate == 0.0:
        return h
    if key is None:
        raise ValueError("dropout > 0 needs a PRNG key")
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), 0.0)


def _multistep(model, h, *, T, train, dropout, key, layer_fn=None):
    """``SpikingNet.__call__`` on the folded batch h (T*N, H, W, C) -> (logits (T*N, K), layers).

    ``layers[i] = layer_fn(a_i, b_i)`` (``(a_i, b_i)`` without ``layer_fn``) with ``(a_i, b_i)`` spiking
    layer i's (spikes, membranes) or, for qcfs, (activations, pre-activations), each (T, N, ...); layer i
    is ``forward``'s i-th call of ``layer``.

    With ``ModelConfig.remat`` each spiking layer (its ``pre``: conv, BatchNorm, ...; its cell; its
    dropout; its ``post``; ``layer_fn``) is one ``jax.checkpoint`` (``_remat``).

    Raises:
      ValueError: ``forward`` calls ``layer`` a number of times other than ``len(model.fan_out)``.
    """
    N = h.shape[0] // T
    keys = None if dropout == 0.0 or key is None else jax.random.split(key, len(model.fan_out))
    layers = []
    reduce = (lambda a, b: (a, b)) if layer_fn is None else layer_fn
    spikes = []  # the layer outputs that are exactly 0/1 (lif cells without dropout or post)

    def cell(i, u, lam, key):
        """(output, reduce(pair)) of spiking layer i on its pre-activation u; lam its threshold (qcfs/if)."""
        if model.is_ann:
            y = qcfs.qcfs(u, lam, model.levels)
            return _dropout(y, dropout, key), reduce(*(a.reshape(T, N, *a.shape[1:]) for a in (y, u)))
        if model.activation == "lif":
            out, sm = spiking(u, T, model.neuron, dropout=dropout, key=key)
            return out, reduce(*sm)
        out, sm = spiking(u / lam, T, model.neuron, dropout=dropout, key=key)
        return out * lam, reduce(*sm)

    def layer(pre, x, *modules, post=None):
        i = len(layers)
        lam = None if model.thresholds is None else model.thresholds[i]
        layer_key = None if keys is None else keys[i]

        def run(x, lam, modules, key):
            out, record = cell(i, pre(x, *modules), lam, key)
            return (out if post is None else post(out)), record

        if model.remat:
            binary = jax.tree.map(lambda a: any(a is s for s in spikes), x)
            out, record = _remat(run, x, binary, lam, modules, layer_key)
        else:
            out, record = run(x, lam, modules, layer_key)
        if model.activation == "lif" and dropout == 0.0 and post is None:
            spikes.append(out)
        layers.append(record)
        return out

    logits = model.forward(h, layer, model._norm(train, T=T))
    if len(layers) != len(model.fan_out):
        raise ValueError(f"{type(model).__name__}.forward calls layer {len(layers)} times, so fan_out needs "
                         f"{len(layers)} entries (one per spiking layer), got {len(model.fan_out)}")
    return logits, tuple(layers)


def _remat(run, x, binary, lam, modules, key):
    """``run(x, lam, modules, key)`` rematerialised: one ``jax.checkpoint``, so the backward pass keeps
    only its inputs and recomputes the layer from them when it needs the layer's intermediates.

    ``binary``: a tree like x, True where the leaf is exactly 0/1 (spikes straight from a LIF layer);
    those leaves are kept as int8 (exact, a quarter of float32): cast outside the checkpoint, back inside
    (``_from_int8``, which takes its derivative from the float leaf, so the gradient still reaches x).
    The modules are split into parameters (differentiated) and the rest (BatchNorm statistics, updated
    in training and returned).

    Two optimisation barriers order the layer as one block (XLA:CPU keeps them only with
    ``xla_disable_hlo_passes="cse_barrier_expander"``; without it, it merges the recomputation with the
    forward pass): one over the layer's inputs, whose transpose makes the layer's gradients (input,
    threshold, parameters) complete together, and one over its outputs (``layer_fn``'s result too).
    """
    graphdef, params, others = nnx.split(modules, nnx.Param, ...)
    kept = jax.tree.map(lambda b, a: a.astype(jnp.int8) if b else a, binary, x)

    @functools.partial(jax.checkpoint, prevent_cse=True)
    def f(kept, x, lam, params, others, key):
        x = jax.tree.map(lambda b, k, a: _from_int8(k, a) if b else a, binary, kept, x)
        x, lam, params = jax.lax.optimization_barrier((x, lam, params))
        mods = nnx.merge(graphdef, params, others, copy=True)
        return jax.lax.optimization_barrier((run(x, lam, mods, key), nnx.split(mods, nnx.Param, ...)[2]))

    result, others = f(kept, x, lam, params, others, key)
    nnx.update(modules, others)
    return result


@jax.custom_jvp
def _from_int8(kept, x):
    """``kept`` (an exact int8 copy of x) in x's dtype, with x's tangent: the value needs only ``kept``,
    the derivative is that of the identity in x (the cast to int8 alone would have none)."""
    return kept.astype(x.dtype)


@_from_int8.defjvp
def _from_int8_jvp(primals, tangents):
    kept, x = primals
    return kept.astype(x.dtype), tangents[1]


def _conv_norm(norm):
    """``pre(x, conv, bn) = norm(bn, conv(x))``: the pre-activation of a conv spiking layer."""
    return lambda x, conv, bn: norm(bn, conv(x))


def _flatten(x):
    return x.reshape(x.shape[0], -1)


class SpikingNet(nnx.Module):
    """Base of the models: one ``forward`` per architecture, run multistep or one step at a time.

    A subclass ends its ``__init__`` with ``super().__init__(cfg, fan_out)`` and defines ``forward(h,
    layer, norm)``, calling ``h = layer(pre, x, *modules, post=None)`` once per spiking layer (the
    protocol and a worked example: the module docstring). ``__call__`` runs ``forward`` on (T*N, ...) with
    the cell scanned over time (each layer one ``jax.checkpoint`` with ``remat``); ``step`` runs it on one
    frame, advancing carried membranes by one ``neurons.lif_step``. Both give the same spikes (a
    feed-forward net is exact in either order).

    Spiking layer i is ``forward``'s i-th call of ``layer``; with ``u = pre(x, *modules)``, by
    ``activation`` (``lam_i = thresholds[i]``, the learnt QCFS threshold; ``layer`` returns ``post(output)``)::

        lif:   s = lif(u; neuron)                                   output s
        qcfs:  y = qcfs(u, lam_i, levels)                           output y   (an ANN; no time dynamics)
        if:    s = lif(u / lam_i; tau=1, vth=1, soft, v0)           output lam_i * s

    The ``if`` cell is the IF neuron of threshold ``lam_i`` and initial membrane ``v0 * lam_i`` (v0 = 0.5:
    half the threshold), soft reset, emitting ``lam_i`` per spike, computed in units of ``lam_i``: dividing
    ``h_t = v_t + x_t``, ``s_t = 1[h_t > lam]``, ``m_t = h_t - lam s_t`` by ``lam > 0`` gives the same
    recursion for ``h / lam``, ``v / lam``, ``x / lam`` with threshold 1, so the spikes are identical and
    the membranes returned (and carried by ``step``) are ``m_t / lam``: one ``NeuronConfig`` serves every
    layer, and RCS reads the membranes with ``vth = 1``.
    """

    CONVERTIBLE = True  # only linear pooling (average), so a QCFS / IF form exists

    def __init__(self, cfg: ModelConfig, fan_out):
        """Stores the activation settings, ``fan_out`` (one entry per spiking layer) and, for qcfs / if,
        the per-layer thresholds (initial 8.0).

        Raises:
          ValueError: activation qcfs / if on a model with ``CONVERTIBLE = False``.
        """
        self.neuron = cfg.neuron
        self.activation = cfg.activation
        self.is_ann = cfg.is_ann  # a QCFS ANN (ModelConfig.is_ann): QCFS activations instead of cells
        self.levels = cfg.levels
        self.fan_out = tuple(fan_out)
        self.remat = cfg.remat
        if cfg.activation != "lif" and not self.CONVERTIBLE:
            raise ValueError(f"{type(self).__name__} uses max pooling, which has no IF equivalent: "
                             f"model.activation must be 'lif', got {cfg.activation!r}")
        self.thresholds = None if cfg.activation == "lif" else \
            nnx.Param(jnp.full((len(self.fan_out),), qcfs.LAM_INIT, jnp.float32))

    def _norm(self, train, *, T=None, t=None):
        """``norm(bn, u)``: BatchNorm (batch statistics when training, else running averages), then TEBN's
        per-timestep scale for a ``TEBatchNorm`` (folded over ``T`` steps, or at step ``t``)."""
        def norm(bn, u):
            y = bn(u, use_running_average=not train)
            return bn.scale_time(y, T=T, t=t) if isinstance(bn, TEBatchNorm) else y
        return norm

    def __call__(self, x, *, train=False, dropout=0.0, key=None, layer_fn=None):
        """x: (T, N, H, W, C) -> (logits (T, N, K), layers), one entry of ``layers`` per spiking layer.

        ``layers[i]`` is ``(spikes, membranes)``, each (T, N, ...), for ``lif`` and ``if`` (``if``
        membranes in units of the layer's threshold); for ``qcfs`` it is ``(activations, pre-activations)``.

        ``layer_fn``: optional ``(a (T, N, ...), b (T, N, ...)) -> pytree`` applied to each layer's pair
        inside the forward pass; ``layers[i]`` is then ``layer_fn(*pair_i)``. With ``remat`` only its
        result leaves the rematerialised region, so a small result (the loss's per-sample RCS scores,
        (N,)) spares the backward pass every layer's (T, N, ...) spikes and membranes.
        """
        if x.ndim != 5:
            raise ValueError(f"expected frames (T, N, H, W, C), got shape {x.shape}")
        T, N = x.shape[:2]
        logits, layers = _multistep(self, x.reshape(T * N, *x.shape[2:]), T=T, train=train, dropout=dropout,
                                    key=key, layer_fn=layer_fn)
        return logits.reshape(T, N, -1), layers

    def _check_spiking(self, what):
        if self.is_ann:
            raise ValueError(f"{what} needs a spiking model; this is a QCFS ANN (activation 'qcfs'): "
                             "convert it first with aoi_jax.convert")

    def init_membranes(self, frame_shape):
        """Initial carried membranes for ``step``: one (N, ...) array per spiking layer, filled with v0.

        Args:
          frame_shape: (N, H, W, C) of one input frame.
        """
        self._check_spiking("init_membranes")
        shapes = []

        def layer(pre, x, *modules, post=None):
            u = pre(x, *modules)
            shapes.append(u)
            return u if post is None else post(u)

        jax.eval_shape(lambda: self.forward(jnp.zeros(frame_shape), layer, self._norm(False, t=0)))
        return tuple(jnp.full(u.shape, self.neuron.v0, u.dtype) for u in shapes)

    def step(self, membranes, frame, t=None):
        """One time step (evaluation mode): ``(membranes, frame (N, H, W, C)) -> (membranes, logits (N, K),
        spikes)``, where ``spikes`` holds each layer's spike count per sample, (L, N). ``t`` (0-based; a
        scalar, or (N,) when each sample is at its own step) is needed only by TEBN models, whose BatchNorm
        scale depends on the step."""
        self._check_spiking("step")
        n = self.neuron
        new, counts = [], []

        def layer(pre, x, *modules, post=None):
            i = len(new)
            u = pre(x, *modules)
            lam = self.thresholds[i] if self.activation == "if" else None
            v, s, _ = neurons.lif_step(membranes[i], u if lam is None else u / lam, tau=n.tau, vth=n.vth,
                                       reset=n.reset, surrogate=n.surrogate, width=n.width)
            new.append(v)
            counts.append(s.reshape(s.shape[0], -1).sum(-1))
            out = s if lam is None else s * lam
            return out if post is None else post(out)

        logits = self.forward(frame, layer, self._norm(False, t=t))
        return tuple(new), logits, jnp.stack(counts)


class SmallSNN(SpikingNet):
    """A small conv SNN for 34x34 event frames (N-Digits, N-MNIST).

    Each stage: Conv 3x3 -> BatchNorm -> LIF -> 2x2 average pool; then Linear on the flattened map.
    """

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        H, W, C = input_shape
        chans = (C, *cfg.channels)
        self.convs = nnx.List([_conv(a, b, 3, 1, 1, rngs) for a, b in zip(chans[:-1], chans[1:])])
        self.norms = nnx.List([_bn(b, rngs, cfg.tebn_steps) for b in chans[1:]])
        for _ in cfg.channels:
            H, W = H // 2, W // 2
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for {len(cfg.channels)} pooling stages")
        self.head = nnx.Linear(H * W * chans[-1], cfg.num_classes, rngs=rngs)
        super().__init__(cfg, tuple(9 * c for c in cfg.channels[1:]) + (cfg.num_classes,))

    def forward(self, h, layer, norm):
        for conv, bn in zip(self.convs, self.norms):
            h = layer(_conv_norm(norm), h, conv, bn, post=avg_pool)
        return self.head(_flatten(h))


VGG_PLAN = (64, 128, "P", 256, 256, "P", 512, 512, "P", 512, 512, "P")


def _vgg_stack(plan, in_shape, convs, norms, rngs, tebn_steps):
    """Appends Conv 3x3 (padding 1) + BatchNorm to ``convs``/``norms`` for each width of ``plan``; "P" is
    a 2x2 pool. Returns the (H, W, C) after the plan, starting from ``in_shape``."""
    H, W, cin = in_shape
    for item in plan:
        if item == "P":
            H, W = H // 2, W // 2
        else:
            convs.append(_conv(cin, item, 3, 1, 1, rngs))
            norms.append(_bn(item, rngs, tebn_steps))
            cin = item
    return H, W, cin


def _run_vgg(plan, h, convs, norms, layer, norm):
    """Runs ``plan`` on ``h``: conv -> norm -> cell per width, with the next of ``convs`` and ``norms``,
    2x2 average pool per "P". Returns h."""
    pairs = iter(zip(convs, norms, strict=True))
    for k, item in enumerate(plan):
        if item != "P":
            pooled = k + 1 < len(plan) and plan[k + 1] == "P"    # the pool runs inside the layer
            h = layer(_conv_norm(norm), h, *next(pairs), post=avg_pool if pooled else None)
        elif k == 0 or plan[k - 1] == "P":
            h = avg_pool(h)
    return h


class VGGSNN(SpikingNet):
    """The reference's VGGSNN (CIFAR10-DVS, N-Caltech101), reference-semantics.md section 10.

    Conv(C->64, k8, s4, p3) then 3x3 convs 64,128,P,256,256,P,512,512,P,512,512,P (P = 2x2 average
    pool), each conv followed by BatchNorm and LIF; Linear(512*h*w, K) on the flattened map (2x2 for
    128x128 input, 2x3 for 180x240).
    """

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        H, W, C = input_shape
        convs, norms = [_conv(C, 64, 8, 4, 3, rngs)], [_bn(64, rngs, cfg.tebn_steps)]
        H, W, cin = _vgg_stack(VGG_PLAN, ((H + 6 - 8) // 4 + 1, (W + 6 - 8) // 4 + 1, 64), convs, norms, rngs,
                               cfg.tebn_steps)
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for VGGSNN")
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.head = nnx.Linear(H * W * cin, cfg.num_classes, rngs=rngs)
        super().__init__(cfg, tuple(9 * c for c in VGG_PLAN if c != "P") + (cfg.num_classes,))

    def forward(self, h, layer, norm):
        h = layer(_conv_norm(norm), h, self.convs[0], self.norms[0])
        h = _run_vgg(VGG_PLAN, h, self.convs[1:], self.norms[1:], layer, norm)
        return self.head(_flatten(h))


class GestureSNN(SpikingNet):
    """The reference's VGG-like DVS128 Gesture net (``VGG_Gesture``) with LIF cells.

    Conv(C->64, k4, s4, valid), Conv 64->128, then four times [2x2 max pool, Conv 128->128], a last
    max pool, each conv followed by BatchNorm and LIF; Linear(128*h*w, 512) + BatchNorm + LIF;
    Linear(512, K). For 128x128 input the map before the first Linear is 1x1. Its max pooling has no IF
    equivalent, so it has no QCFS / IF form.
    """

    CONVERTIBLE = False

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        H, W, C = input_shape
        tebn = cfg.tebn_steps
        self.convs = nnx.List([_conv(C, 64, 4, 4, "VALID", rngs), _conv(64, 128, 3, 1, 1, rngs)]
                              + [_conv(128, 128, 3, 1, 1, rngs) for _ in range(4)])
        self.norms = nnx.List([_bn(64, rngs, tebn)] + [_bn(128, rngs, tebn) for _ in range(5)])
        H, W = H // 4 // 32, W // 4 // 32
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for GestureSNN (needs at least 128x128)")
        self.fc = nnx.Linear(128 * H * W, 512, rngs=rngs)
        self.fc_norm = _bn(512, rngs)  # a BatchNorm1d in the reference: TEBN leaves it plain
        self.head = nnx.Linear(512, cfg.num_classes, rngs=rngs)
        super().__init__(cfg, (9 * 128,) * 5 + (512, cfg.num_classes))

    def forward(self, h, layer, norm):
        for i, (conv, bn) in enumerate(zip(self.convs, self.norms)):
            if i >= 2:
                h = _max_pool(h)
            h = layer(_conv_norm(norm), h, conv, bn)
        h = _max_pool(h)
        h = layer(lambda x, fc, bn: norm(bn, fc(_flatten(x))), h, self.fc, self.fc_norm)
        return self.head(h)


class BasicBlock(nnx.Module):
    """ResNet basic block (the reference's ``BasicBlock``), two spiking layers::

        o = cell(norm(bn1, conv3x3_s(h)))
        o = cell(norm(bn2, conv3x3(o)) + shortcut(h))

    shortcut = identity, or conv1x1_s + BatchNorm when the stride or the width changes; convs without bias.
    """

    def __init__(self, cin, cout, stride, tebn_steps, *, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, cout, 3, stride, 1, rngs, use_bias=False)
        self.bn1 = _bn(cout, rngs, tebn_steps)
        self.conv2 = _conv(cout, cout, 3, 1, 1, rngs, use_bias=False)
        self.bn2 = _bn(cout, rngs, tebn_steps)
        self.projection = stride != 1 or cin != cout
        if self.projection:
            self.short_conv = _conv(cin, cout, 1, stride, 0, rngs, use_bias=False)
            self.short_bn = _bn(cout, rngs, tebn_steps)

    def __call__(self, h, layer, norm):
        o = layer(_conv_norm(norm), h, self.conv1, self.bn1)

        def second(x, conv2, bn2, *shortcut):
            o, h = x
            return norm(bn2, conv2(o)) + (norm(shortcut[1], shortcut[0](h)) if shortcut else h)

        shortcut = (self.short_conv, self.short_bn) if self.projection else ()
        return layer(second, (o, h), self.conv2, self.bn2, *shortcut)


class ResNet(SpikingNet):
    """CIFAR ResNets of the reference (``models/ResNet.py``): ResNet-18 and ResNet-20.

    Stem Conv 3x3 (C -> w0, no bias) + BatchNorm + cell, no max pool; stages of ``BasicBlock``s, the
    first block of each stage after the first with stride 2; global average pool; Linear(w_last, K).
    ResNet-18: widths 64, 128, 256, 512, two blocks each (17 spiking layers). ResNet-20: widths 16, 32,
    64, three blocks each (19 spiking layers). Fan-out of a block's input: 9 w (its conv1) plus 1 for an
    identity shortcut or w for a projection; of the last layer: K.
    """

    STAGES: tuple[tuple[int, int], ...] = ()  # (width, blocks) per stage

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        w0 = self.STAGES[0][0]
        self.stem = _conv(input_shape[-1], w0, 3, 1, 1, rngs, use_bias=False)
        self.stem_bn = _bn(w0, rngs, cfg.tebn_steps)
        blocks, cin = [], w0
        for s, (width, n) in enumerate(self.STAGES):
            for b in range(n):
                blocks.append(BasicBlock(cin, width, 2 if s > 0 and b == 0 else 1, cfg.tebn_steps, rngs=rngs))
                cin = width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, cfg.num_classes, rngs=rngs)
        fan_out = []
        for blk in self.blocks:  # the layer feeding each block, then the block's inner layer
            cout = blk.conv1.out_features
            fan_out += [9 * cout + (cout if blk.projection else 1), 9 * cout]
        super().__init__(cfg, fan_out + [cfg.num_classes])

    def forward(self, h, layer, norm):
        h = layer(_conv_norm(norm), h, self.stem, self.stem_bn)
        for block in self.blocks:
            h = block(h, layer, norm)
        return self.head(h.mean(axis=(1, 2)))


class ResNet18(ResNet):
    __doc__ = ResNet.__doc__
    STAGES = ((64, 2), (128, 2), (256, 2), (512, 2))


class ResNet20(ResNet):
    __doc__ = ResNet.__doc__
    STAGES = ((16, 3), (32, 3), (64, 3))


VGG16_PLAN = (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P")


class VGG16(SpikingNet):
    """The reference's CIFAR VGG-16 (``models/VGG.py``, dropout 0) with average pooling.

    Conv 3x3 (with bias) + BatchNorm + cell for 64,64,P,128,128,P,256x3,P,512x3,P,512x3,P (P = 2x2
    average pool); then Linear(512*h*w, 4096) + cell, Linear(4096, 4096) + cell, Linear(4096, K)
    (h = w = 1 for 32x32 input): 15 spiking layers.
    """

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        convs, norms = [], []
        H, W, cin = _vgg_stack(VGG16_PLAN, input_shape, convs, norms, rngs, cfg.tebn_steps)
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for VGG-16 (needs at least 32x32)")
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.fc1 = nnx.Linear(H * W * cin, 4096, rngs=rngs)
        self.fc2 = nnx.Linear(4096, 4096, rngs=rngs)
        self.head = nnx.Linear(4096, cfg.num_classes, rngs=rngs)
        widths = [c for c in VGG16_PLAN if c != "P"]
        super().__init__(cfg, [9 * c for c in widths[1:]] + [4096, 4096, cfg.num_classes])

    def forward(self, h, layer, norm):
        h = _run_vgg(VGG16_PLAN, h, self.convs, self.norms, layer, norm)
        h = layer(lambda x, fc: fc(_flatten(x)), h, self.fc1)
        h = layer(lambda x, fc: fc(x), h, self.fc2)
        return self.head(h)


MODELS = {"small_snn": SmallSNN, "vggsnn": VGGSNN, "gesture_snn": GestureSNN, "resnet18": ResNet18,
          "resnet20": ResNet20, "vgg16": VGG16}

IF_NEURON = {"tau": 1.0, "vth": 1.0, "reset": "soft"}  # activation qcfs / if: the IF cell in units of lam


def build(cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named ``cfg.name`` for per-step frames of ``input_shape = (H, W, C)``.

    Raises:
      ValueError: unknown model name (the message lists the valid ones); ``channels`` set for a fixed
        plan or empty for small_snn; activation qcfs / if with a neuron other than ``IF_NEURON`` or on
        a model with max pooling; TEBN with activation other than lif.
    """
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model.name {cfg.name!r}; valid: {sorted(MODELS)}")
    if cfg.name != "small_snn" and cfg.channels:
        raise ValueError(f"model.channels is only read by small_snn; {cfg.name} has a fixed plan, "
                         f"set model.channels=() (got {cfg.channels})")
    if cfg.name == "small_snn" and not cfg.channels:
        raise ValueError("small_snn needs at least one conv width in model.channels")
    if cfg.activation != "lif":
        wrong = {k: getattr(cfg.neuron, k) for k, v in IF_NEURON.items() if getattr(cfg.neuron, k) != v}
        if wrong:
            raise ValueError(f"model.activation {cfg.activation!r} converts to IF cells in units of the "
                             f"layer threshold: model.neuron needs {IF_NEURON}, got {wrong}")
        if cfg.tebn_steps:
            raise ValueError(f"model.tebn_steps is for directly trained SNNs (activation 'lif'), "
                             f"got activation {cfg.activation!r}")
    return MODELS[cfg.name](cfg, tuple(input_shape), rngs=rngs)


def with_neuron(cfg: ModelConfig, **changes) -> ModelConfig:
    """``cfg`` with neuron fields replaced, e.g. ``with_neuron(cfg, reset="soft")``."""
    return dataclasses.replace(cfg, neuron=dataclasses.replace(cfg.neuron, **changes))
