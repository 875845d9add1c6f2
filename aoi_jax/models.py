"""Spiking networks: NNX Conv/BatchNorm/Linear on the folded (T*N, ...) batch, cells scanned in between.

docs/semantics.md sections 1 and 10. Every model maps time-major frames ``(T, N, H, W, C)`` to
``(logits (T, N, K), layers)``, where ``layers`` is a tuple with one ``(spikes, membranes)`` pair per
spiking layer, each ``(T, N, ...)``: the regulariser reads them from the return value, never via hooks.
Each model's ``fan_out`` gives, per spiking layer, the synapses one spike of an interior unit drives in
the next layer (k*k*C_out for a following conv, the width of a following Linear); synaptic operations are
spikes times fan-out (docs/semantics.md section 9 item 3; border effects are ignored).

Calibration (docs/semantics.md section 7) runs the forward pass with inverted dropout of rate
``dropout`` on every spiking layer's output; it draws from the explicit ``key``.

``ModelConfig.activation`` picks what a ``SpikingLayer`` runs on its pre-activation (one architecture):
``"lif"`` the cell of ``ModelConfig.neuron`` (direct training); ``"qcfs"`` the QCFS activation of an ANN
with a learnt threshold ``lam_l`` per layer (``aoi_jax.qcfs``); ``"if"`` the converted SNN, IF cells of
threshold ``lam_l`` emitting ``lam_l`` per spike (``aoi_jax.convert``). ``ModelConfig.tebn_steps > 0``
makes every conv BatchNorm a ``TEBatchNorm`` (TEBN's per-timestep scale).

Adding an architecture: subclass ``SpikingNet`` and add the class to ``MODELS``. In ``__init__`` create the
NNX modules as usual; each spiking layer is a ``SpikingLayer(pre, cfg, features, post=)`` owning its
pre-activation ``pre`` (an ``nnx.Module``, e.g. ``nnx.Sequential(conv, bn)``; it may share modules the
model also holds), its cell (``ModelConfig.neuron``, ``features`` channels) and ``post`` (a plain function
on its output, e.g. ``avg_pool``); end with ``super().__init__(cfg, fan_out)``, one ``fan_out`` entry per
spiking layer. Write ``forward(x)`` as any NNX ``__call__``, on one folded batch ``x`` (B, H, W, C): a
spiking layer called on its inputs returns ``(output, record)``; ``forward`` returns ``(logits (B, K),
records)``, the records in the order the layers ran. Spiking layer i is the i-th one ``forward`` calls
(``build`` numbers them once, by tracing ``forward``). That one ``forward`` serves every mode, which
``SpikingNet`` sets on a working copy of the model for the duration of one call (``_Call``):

- ``__call__`` (training, evaluation, calibration dropout): ``x`` is (T*N, ...); each layer runs ``pre``
  on the folded batch and scans only its cell over T (a conv inside a scan is slow on XLA:CPU); its
  record is (spikes, membranes) (T, N, ...), or ``layer_fn`` of them; with ``ModelConfig.remat`` each
  layer is one ``jax.checkpoint``.
- ``step`` (one frame, carried membranes: ``anytime.serve``): each layer advances its cell by one step.
- the activation (lif / qcfs / if, above) and ``TEBatchNorm``'s scale ``p_t`` (over T, or at step t) are
  read by the layers from the same call, so QCFS / IF conversion needs nothing from the model (set
  ``CONVERTIBLE = False`` if it max-pools).

``model.channels`` is small_snn's: other models set it to ``()``. README.md, "Extending it", shows a complete
new model in this style with remat on; tests/test_models.py runs that very block.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from aoi_jax import neurons, qcfs
from aoi_jax.config import ModelConfig

_kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin, cout, kernel, stride, padding, rngs, *, use_bias=True):
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                    padding=padding if isinstance(padding, str) else [(padding, padding)] * 2,
                    use_bias=use_bias, kernel_init=_kaiming_fan_out, rngs=rngs)




@dataclasses.dataclass(eq=False)
class _Call:
    """One call of a ``SpikingNet``, read by its ``SpikingLayer``s and ``TEBatchNorm``s (a static attribute of
    the working copy that ``SpikingNet`` runs; compared by identity).

    kind: "multistep" (``__call__``: the folded (T*N, ...) batch), "step" (one frame) or "probe" (shapes,
    initial membranes and the order of the layers; ``probe(layer, pre, *inputs)`` is called by each layer).
    """

    kind: str
    T: int | None = None
    train: bool = False
    dropout: float = 0.0
    remat: bool = False
    layer_fn: Callable | None = None
    probe: Callable | None = None


class _Inputs(nnx.Variable):
    """The arrays of one call, shared by the layers of the working copy: {"key": dropout key, "thresholds":
    (L,) lam (qcfs / if), "membranes": one (N, ...) per layer (step), "t": the step of TEBN (step)}."""


class TEBatchNorm(nnx.BatchNorm):
    """BatchNorm followed by TEBN's learnt per-timestep scale (docs/semantics.md section 4).

    The reference's ``TEBNLayer``: BatchNorm3d over (N, C, T, H, W), i.e. statistics per channel over
    (N, T, H, W), then ``y_t * p_t`` with one scalar ``p_t`` per time step, initialised to 1::

        y   = gamma * (u - mean) / sqrt(var + eps) + beta      # mean, var over (T*N, H, W): all steps
        out = p_t * y_t

    On the folded (T*N, ...) batch plain BatchNorm already takes its statistics over time, so only the
    scale is new. Inside a ``SpikingNet`` call it scales by the call's T (multistep) or t (one step).

    Raises:
      ValueError: called outside a ``SpikingNet`` call (no T or t).
    """

    def __init__(self, num_features, timesteps, *, rngs: nnx.Rngs):
        super().__init__(num_features, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.time_scale = nnx.Param(jnp.ones((timesteps,), jnp.float32))
        self.call, self.inputs = None, nnx.data(None)   # set for one call by SpikingNet._run

    def __call__(self, x, use_running_average=None, *, mask=None):
        y = super().__call__(x, use_running_average, mask=mask)
        call = self.call
        if call is None:
            raise ValueError("TEBatchNorm scales each time step by p_t: it runs inside SpikingNet.__call__ or "
                             "step, which give T (folded batch) or t (one step)")
        if call.kind == "multistep":
            return self.scale_time(y, T=call.T)
        t = self.inputs["t"] if call.kind == "step" else 0
        return self.scale_time(y, t=t)

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


def max_pool(h):
    """2x2 max pooling, stride 2, of (B, H, W, C)."""
    return nnx.max_pool(h, (2, 2), strides=(2, 2))


def flatten(x):
    """(B, ...) -> (B, prod(...))."""
    return x.reshape(x.shape[0], -1)


def dropout(h, rate, key):
    """Inverted dropout: each entry kept with probability 1 - rate and scaled by 1 / (1 - rate).

    Raises:
      ValueError: rate > 0 without a key.
    """
    if rate == 0.0:
        return h
    if key is None:
        raise ValueError("dropout > 0 needs a PRNG key")
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), 0.0)


class SpikingLayer(nnx.Module):
    """One spiking layer: ``pre`` (the affine part), the cell, ``post``; called ``(output, record) =
    layer(*inputs)`` inside a ``SpikingNet`` call.

    With ``u = pre(*inputs)``, ``lam_i = thresholds[i]`` (i: the layer's number, ``build``), by
    ``ModelConfig.activation``, the output before ``post`` and inverted dropout (calibration)::

        lif:   s, m = cell(u)                                  output s
        qcfs:  y = qcfs(u, lam_i, levels)                      output y    (an ANN; record (y, u))
        if:    s, m = cell(u / lam_i)  (tau=1, vth=1, soft)    output lam_i * s

    The ``if`` cell is the IF neuron of threshold ``lam_i`` and initial membrane ``v0 * lam_i`` (v0 = 0.5:
    half the threshold), soft reset, emitting ``lam_i`` per spike, computed in units of ``lam_i``: dividing
    ``h_t = v_t + x_t``, ``s_t = 1[h_t > lam]``, ``m_t = h_t - lam s_t`` by ``lam > 0`` gives the same
    recursion for ``h / lam``, ``v / lam``, ``x / lam`` with threshold 1, so the spikes are identical and
    the membranes returned (and carried by ``step``) are ``m_t / lam``: one ``NeuronConfig`` serves every
    layer, and RCS reads the membranes with ``vth = 1``.

    Multistep (``SpikingNet.__call__``): ``pre`` and ``post`` on the folded (T*N, ...) batch, the cell
    scanned over T; record ``(s, m)`` (T, N, ...), or ``layer_fn(s, m)``; with remat the whole layer is one
    ``jax.checkpoint`` (the backward pass keeps its inputs and recomputes it), with an optimisation barrier
    over its inputs and parameters and one over its outputs, so that the layer is recomputed as one block
    when its cotangent arrives (XLA:CPU keeps them only with ``xla_tuning.CPU_REMAT_OPTIONS``;
    docs/performance.md has what they save). One step (``SpikingNet.step``): ``cell.step`` from
    the carried membrane; record ``(s, v_next)`` (N, ...).

    Args:
      pre: an ``nnx.Module`` taking the layer's inputs (a closure would keep the modules of the model it
        was built in, not those of the copy ``nnx.merge`` makes).  cfg: the model config (activation,
        levels, neuron).  features: channels of u (for the cell).  post: a function on the output.
    Raises:
      TypeError: ``pre`` is not an ``nnx.Module``.
    """

    def __init__(self, pre: nnx.Module, cfg: ModelConfig, features: int, *, post: Callable | None = None,
                 rngs: nnx.Rngs):
        if not isinstance(pre, nnx.Module):
            raise TypeError(f"SpikingLayer's pre must be an nnx.Module owning its modules (e.g. "
                            f"nnx.Sequential(conv, bn)), got {pre!r}")
        self.pre, self.post = pre, post
        self.cell = neurons.cell(cfg.neuron, features, rngs=rngs)
        self.activation, self.levels = cfg.activation, cfg.levels
        self.index = None       # set by build: the order in which forward calls the layer
        self.call, self.inputs = None, nnx.data(None)   # set for one call by SpikingNet._run

    def __call__(self, *inputs):
        call = self.call
        if call is None or self.index is None:
            raise ValueError("a SpikingLayer runs inside SpikingNet.__call__ / step of a model made by "
                             "models.build (which numbers the layers)")
        if call.kind == "probe":
            call.probe(self, self.pre, *inputs)
        if not (call.kind == "multistep" and call.remat):
            return self._apply(inputs)
        graphdef, params, others = nnx.split(self, nnx.Param, ...)

        @jax.checkpoint
        def rematerialised(inputs, params, others):
            inputs, params = jax.lax.optimization_barrier((inputs, params))
            layer = nnx.merge(graphdef, params, others, copy=True)
            return jax.lax.optimization_barrier((layer._apply(inputs), nnx.split(layer, nnx.Param, ...)[2]))

        out, others = rematerialised(inputs, params, others)
        nnx.update(self, others)
        return out

    def _apply(self, inputs):
        call, i = self.call, self.index
        u = self.pre(*inputs)
        if call.kind == "probe":
            return self._out(u), self.cell.initial(u.shape)
        lam = None if self.activation == "lif" else self.inputs["thresholds"][i]
        if call.kind == "step":
            if self.activation == "qcfs":
                raise ValueError("one-step inference needs a spiking model; this is a QCFS ANN (activation "
                                 "'qcfs'): convert it first with aoi_jax.convert")
            v, s, _ = self.cell.step(self.inputs["membranes"][i], u if lam is None else u / lam)
            return self._out(s if lam is None else s * lam), (s, v)
        key = self.inputs["key"]
        key = None if key is None else jax.random.fold_in(key, i)
        T = call.T
        if self.activation == "qcfs":
            y = qcfs.qcfs(u, lam, self.levels)
            out, pair = dropout(y, call.dropout, key), tuple(a.reshape(T, -1, *a.shape[1:]) for a in (y, u))
        else:
            x = u if lam is None else u / lam
            s, m = self.cell(x.reshape(T, x.shape[0] // T, *x.shape[1:]))
            out = dropout(s, call.dropout, key).reshape(u.shape)
            out, pair = (out if lam is None else out * lam), (s, m)
        return self._out(out), pair if call.layer_fn is None else call.layer_fn(*pair)

    def _out(self, h):
        return h if self.post is None else self.post(h)


class SpikingNet(nnx.Module):
    """Base of the models: one ``forward`` per architecture, run multistep or one step at a time.

    A subclass creates its modules and ``SpikingLayer``s, ends its ``__init__`` with
    ``super().__init__(cfg, fan_out)`` and defines ``forward(x) -> (logits, records)`` on a folded batch (the
    module docstring; README.md, "Extending it"). ``__call__`` runs ``forward`` on (T*N, ...) with the cells
    scanned over time; ``step`` runs it on one frame, advancing carried membranes by one cell step. Both give
    the same spikes (a feed-forward net is exact in either order). Each call runs on a working copy of the
    model (``nnx.split`` / ``nnx.merge`` in the caller's trace) whose layers, BatchNorms and TEBNs are told
    the call (``_Call``, ``_Inputs``); a training call writes the copy's BatchNorm statistics back.
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
        self.fan_out = tuple(fan_out)
        self.remat = cfg.remat
        if cfg.activation != "lif" and not self.CONVERTIBLE:
            raise ValueError(f"{type(self).__name__} uses max pooling, which has no IF equivalent: "
                             f"model.activation must be 'lif', got {cfg.activation!r}")
        self.thresholds = None if cfg.activation == "lif" else \
            nnx.Param(jnp.full((len(self.fan_out),), qcfs.LAM_INIT, jnp.float32))

    def forward(self, x):
        """(logits (B, K), records) of a folded batch x (B, H, W, C): the architecture (subclasses)."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(x) -> (logits, records)")

    def _run(self, call: _Call, x, **inputs):
        """``forward(x)`` on a working copy told ``call`` and ``inputs``; BatchNorm statistics written back
        when training.

        Raises:
          ValueError: ``forward`` returns a number of records other than ``len(fan_out)``.
        """
        graphdef, state = nnx.split(self)
        model = nnx.merge(graphdef, state, copy=True)
        shared = _Inputs({"key": None, "thresholds": None if self.thresholds is None else model.thresholds[...],
                          "membranes": None, "t": None, **inputs})
        for _, node in nnx.iter_graph(model):
            if isinstance(node, (SpikingLayer, TEBatchNorm)):
                node.call, node.inputs = call, shared
            if isinstance(node, nnx.BatchNorm):
                node.use_running_average = not call.train
        logits, layers = model.forward(x)
        if len(layers) != len(self.fan_out):
            raise ValueError(f"{type(self).__name__}.forward returns {len(layers)} spiking layers' records, so "
                             f"fan_out needs {len(layers)} entries (one per spiking layer), got {len(self.fan_out)}")
        if call.train:
            nnx.update(self, nnx.state(model, nnx.BatchStat))
        return logits, tuple(layers)

    def __call__(self, x, *, train=False, dropout=0.0, key=None, layer_fn=None):
        """x: (T, N, H, W, C) -> (logits (T, N, K), layers), one entry of ``layers`` per spiking layer.

        ``layers[i]`` is ``(spikes, membranes)``, each (T, N, ...), for ``lif`` and ``if`` (``if``
        membranes in units of the layer's threshold); for ``qcfs`` it is ``(activations, pre-activations)``.

        ``layer_fn``: optional ``(a (T, N, ...), b (T, N, ...)) -> pytree`` applied to each layer's pair
        inside the forward pass; ``layers[i]`` is then ``layer_fn(*pair_i)``. With ``remat`` only its
        result leaves the rematerialised layer, so a small result (the loss's per-sample RCS scores,
        (N,)) spares the backward pass every layer's (T, N, ...) spikes and membranes.

        Raises:
          ValueError: x is not (T, N, H, W, C); dropout > 0 without a key.
        """
        if x.ndim != 5:
            raise ValueError(f"expected frames (T, N, H, W, C), got shape {x.shape}")
        T, N = x.shape[:2]
        call = _Call("multistep", T=T, train=train, dropout=dropout, remat=self.remat, layer_fn=layer_fn)
        logits, layers = self._run(call, x.reshape(T * N, *x.shape[2:]), key=key)
        return logits.reshape(T, N, -1), layers

    def probe(self, frame, fn):
        """``forward`` on ``frame`` (N, H, W, C) with ``fn(layer, pre, *inputs)`` called by each spiking layer
        (cells replaced by the identity: shapes only); returns ``(logits, initial membranes per layer)``."""
        return self._run(_Call("probe", probe=fn), frame)

    def init_membranes(self, frame_shape):
        """Initial carried membranes for ``step``: one (N, ...) array per spiking layer (the cell's v0).

        Args:
          frame_shape: (N, H, W, C) of one input frame.
        Raises:
          ValueError: a QCFS ANN (no membranes: convert it first).
        """
        self._check_spiking("init_membranes")
        return self.probe(jnp.zeros(frame_shape, jnp.float32), lambda *_: None)[1]

    def _check_spiking(self, what):
        if self.activation == "qcfs":
            raise ValueError(f"{what} needs a spiking model; this is a QCFS ANN (activation 'qcfs'): "
                             "convert it first with aoi_jax.convert")

    def step(self, membranes, frame, t=None):
        """One time step (evaluation mode): ``(membranes, frame (N, H, W, C)) -> (membranes, logits (N, K),
        spikes)``, where ``spikes`` holds each layer's spike count per sample, (L, N). ``t`` (0-based; a
        scalar, or (N,) when each sample is at its own step) is needed only by TEBN models, whose BatchNorm
        scale depends on the step."""
        self._check_spiking("step")
        logits, layers = self._run(_Call("step"), frame, membranes=tuple(membranes), t=t)
        counts = jnp.stack([s.reshape(s.shape[0], -1).sum(-1) for s, _ in layers])
        return tuple(v for _, v in layers), logits, counts

    def spiking_layers(self) -> list:
        """The ``SpikingLayer``s, in the order ``forward`` calls them (layer i first)."""
        layers = [node for _, node in nnx.iter_graph(self) if isinstance(node, SpikingLayer)]
        return sorted(layers, key=lambda layer: layer.index)

    def cell_values(self) -> list[dict]:
        """Each spiking layer's ``cell.values()`` (its learnt neuron parameters, e.g. PLIF's leak), in order."""
        return [layer.cell.values() for layer in self.spiking_layers()]


def _number_layers(model: SpikingNet, input_shape):
    """Sets each ``SpikingLayer.index`` to the order in which ``forward`` calls it (one abstract trace).

    Raises:
      ValueError: a layer called twice or never; the number of layers differs from ``len(fan_out)``.
    """
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, SpikingLayer)]
    for k, layer in enumerate(layers):
        layer.index = k
    order = []
    frame = jnp.zeros((1, *input_shape), jnp.float32)
    jax.eval_shape(lambda: model.probe(frame, lambda layer, *_: order.append(layer.index)))
    name = type(model).__name__
    if sorted(order) != list(range(len(layers))):
        raise ValueError(f"{name}.forward must call each of its {len(layers)} SpikingLayers once, called "
                         f"them in the order {order} (numbered as the model holds them)")
    for i, k in enumerate(order):
        layers[k].index = i


class SmallSNN(SpikingNet):
    """A small conv SNN for 34x34 event frames (N-Digits, N-MNIST).

    Each stage: Conv 3x3 -> BatchNorm -> LIF -> 2x2 average pool; then Linear on the flattened map.
    """

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        H, W, C = input_shape
        chans = (C, *cfg.channels)
        self.convs = nnx.List([_conv(a, b, 3, 1, 1, rngs) for a, b in zip(chans[:-1], chans[1:])])
        self.norms = nnx.List([_bn(b, rngs, cfg.tebn_steps) for b in chans[1:]])
        self.stages = nnx.List([SpikingLayer(nnx.Sequential(conv, bn), cfg, c, post=avg_pool, rngs=rngs)
                                for conv, bn, c in zip(self.convs, self.norms, cfg.channels)])
        for _ in cfg.channels:
            H, W = H // 2, W // 2
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for {len(cfg.channels)} pooling stages")
        self.head = nnx.Linear(H * W * chans[-1], cfg.num_classes, rngs=rngs)
        super().__init__(cfg, tuple(9 * c for c in cfg.channels[1:]) + (cfg.num_classes,))

    def forward(self, x):
        h, layers = x, []
        for stage in self.stages:
            h, record = stage(h)
            layers.append(record)
        return self.head(flatten(h)), tuple(layers)


VGG_PLAN = (64, 128, "P", 256, 256, "P", 512, 512, "P", 512, 512, "P")


def _vgg_stack(plan, in_shape, cfg, rngs):
    """Conv 3x3 (padding 1) + BatchNorm + ``SpikingLayer`` for each width of ``plan``, a 2x2 average pool
    (the layer's ``post``) for each "P" after a width. Returns (convs, norms, layers, (H, W, C) after it).

    Raises:
      ValueError: a "P" that does not follow a width.
    """
    H, W, cin = in_shape
    convs, norms, layers = [], [], []
    for k, item in enumerate(plan):
        if item == "P":
            if k == 0 or plan[k - 1] == "P":
                raise ValueError(f"plan {plan}: each pool must follow a conv width")
            H, W = H // 2, W // 2
            continue
        convs.append(_conv(cin, item, 3, 1, 1, rngs))
        norms.append(_bn(item, rngs, cfg.tebn_steps))
        pooled = k + 1 < len(plan) and plan[k + 1] == "P"
        layers.append(SpikingLayer(nnx.Sequential(convs[-1], norms[-1]), cfg, item, post=avg_pool if pooled else None,
                                   rngs=rngs))
        cin = item
    return convs, norms, layers, (H, W, cin)


def _run_layers(layers, h):
    """Each layer of ``layers`` on the previous one's output: (h, records)."""
    records = []
    for layer in layers:
        h, record = layer(h)
        records.append(record)
    return h, records


class VGGSNN(SpikingNet):
    """The reference's VGGSNN (CIFAR10-DVS, N-Caltech101), docs/semantics.md section 10.

    Conv(C->64, k8, s4, p3) then 3x3 convs 64,128,P,256,256,P,512,512,P,512,512,P (P = 2x2 average
    pool), each conv followed by BatchNorm and LIF; Linear(512*h*w, K) on the flattened map (2x2 for
    128x128 input, 2x3 for 180x240).
    """

    def __init__(self, cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs):
        H, W, C = input_shape
        conv0, bn0 = _conv(C, 64, 8, 4, 3, rngs), _bn(64, rngs, cfg.tebn_steps)
        convs, norms, layers, (H, W, cin) = _vgg_stack(VGG_PLAN, ((H + 6 - 8) // 4 + 1, (W + 6 - 8) // 4 + 1, 64),
                                                       cfg, rngs)
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for VGGSNN")
        self.convs, self.norms = nnx.List([conv0, *convs]), nnx.List([bn0, *norms])
        self.stages = nnx.List([SpikingLayer(nnx.Sequential(conv0, bn0), cfg, 64, rngs=rngs), *layers])
        self.head = nnx.Linear(H * W * cin, cfg.num_classes, rngs=rngs)
        super().__init__(cfg, tuple(9 * c for c in VGG_PLAN if c != "P") + (cfg.num_classes,))

    def forward(self, x):
        h, layers = _run_layers(self.stages, x)
        return self.head(flatten(h)), tuple(layers)


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
        # the max pool before convs 2..5 and before the Linear runs as the previous layer's post
        self.stages = nnx.List([SpikingLayer(nnx.Sequential(conv, bn), cfg, conv.out_features,
                                             post=max_pool if i >= 1 else None, rngs=rngs)
                                for i, (conv, bn) in enumerate(zip(self.convs, self.norms))]
                               + [SpikingLayer(nnx.Sequential(flatten, self.fc, self.fc_norm), cfg, 512, rngs=rngs)])
        super().__init__(cfg, (9 * 128,) * 5 + (512, cfg.num_classes))

    def forward(self, x):
        h, layers = _run_layers(self.stages, x)
        return self.head(h), tuple(layers)


class _Residual(nnx.Module):
    """The pre-activation of a basic block's second layer: ``norm(bn2, conv2(o)) + shortcut(h)``."""

    def __init__(self, conv2, bn2, shortcut: nnx.Module | None):
        self.conv2, self.bn2, self.shortcut = conv2, bn2, shortcut

    def __call__(self, o, h):
        return self.bn2(self.conv2(o)) + (h if self.shortcut is None else self.shortcut(h))


class BasicBlock(nnx.Module):
    """ResNet basic block (the reference's ``BasicBlock``), two spiking layers::

        o = cell(bn1(conv3x3_s(h)))
        o = cell(bn2(conv3x3(o)) + shortcut(h))

    shortcut = identity, or conv1x1_s + BatchNorm when the stride or the width changes; convs without bias.
    """

    def __init__(self, cin, cout, stride, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, cout, 3, stride, 1, rngs, use_bias=False)
        self.bn1 = _bn(cout, rngs, cfg.tebn_steps)
        self.conv2 = _conv(cout, cout, 3, 1, 1, rngs, use_bias=False)
        self.bn2 = _bn(cout, rngs, cfg.tebn_steps)
        self.projection = stride != 1 or cin != cout
        shortcut = None
        if self.projection:
            self.short_conv = _conv(cin, cout, 1, stride, 0, rngs, use_bias=False)
            self.short_bn = _bn(cout, rngs, cfg.tebn_steps)
            shortcut = nnx.Sequential(self.short_conv, self.short_bn)
        self.spiking1 = SpikingLayer(nnx.Sequential(self.conv1, self.bn1), cfg, cout, rngs=rngs)
        self.spiking2 = SpikingLayer(_Residual(self.conv2, self.bn2, shortcut), cfg, cout, rngs=rngs)

    def __call__(self, h):
        o, first = self.spiking1(h)
        o, second = self.spiking2(o, h)
        return o, (first, second)


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
        self.stem_spiking = SpikingLayer(nnx.Sequential(self.stem, self.stem_bn), cfg, w0, rngs=rngs)
        blocks, cin = [], w0
        for s, (width, n) in enumerate(self.STAGES):
            for b in range(n):
                blocks.append(BasicBlock(cin, width, 2 if s > 0 and b == 0 else 1, cfg, rngs=rngs))
                cin = width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, cfg.num_classes, rngs=rngs)
        fan_out = []
        for blk in self.blocks:  # the layer feeding each block, then the block's inner layer
            cout = blk.conv1.out_features
            fan_out += [9 * cout + (cout if blk.projection else 1), 9 * cout]
        super().__init__(cfg, fan_out + [cfg.num_classes])

    def forward(self, x):
        h, stem = self.stem_spiking(x)
        layers = [stem]
        for block in self.blocks:
            h, records = block(h)
            layers += records
        return self.head(h.mean(axis=(1, 2))), tuple(layers)


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
        convs, norms, layers, (H, W, cin) = _vgg_stack(VGG16_PLAN, input_shape, cfg, rngs)
        if H == 0 or W == 0:
            raise ValueError(f"input {input_shape} too small for VGG-16 (needs at least 32x32)")
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.fc1 = nnx.Linear(H * W * cin, 4096, rngs=rngs)
        self.fc2 = nnx.Linear(4096, 4096, rngs=rngs)
        self.head = nnx.Linear(4096, cfg.num_classes, rngs=rngs)
        self.stages = nnx.List([*layers, SpikingLayer(nnx.Sequential(flatten, self.fc1), cfg, 4096, rngs=rngs),
                                SpikingLayer(nnx.Sequential(self.fc2), cfg, 4096, rngs=rngs)])
        widths = [c for c in VGG16_PLAN if c != "P"]
        super().__init__(cfg, [9 * c for c in widths[1:]] + [4096, 4096, cfg.num_classes])

    def forward(self, x):
        h, layers = _run_layers(self.stages, x)
        return self.head(h), tuple(layers)


MODELS = {"small_snn": SmallSNN, "vggsnn": VGGSNN, "gesture_snn": GestureSNN, "resnet18": ResNet18,
          "resnet20": ResNet20, "vgg16": VGG16}

IF_NEURON = {"tau": 1.0, "vth": 1.0, "reset": "soft"}  # activation qcfs / if: the IF cell in units of lam


def build(cfg: ModelConfig, input_shape, *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named ``cfg.name`` for per-step frames of ``input_shape = (H, W, C)`` and numbers its
    spiking layers in the order its ``forward`` calls them (one abstract trace).

    Raises:
      ValueError: unknown model name (the message lists the valid ones); ``channels`` set for a fixed
        plan or empty for small_snn; activation qcfs / if with a neuron other than ``IF_NEURON`` or on
        a model with max pooling; TEBN with activation other than lif; a ``forward`` that does not call
        each spiking layer once, or whose layers do not match ``fan_out``.
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
    model = MODELS[cfg.name](cfg, tuple(input_shape), rngs=rngs)
    _number_layers(model, tuple(input_shape))
    return model


def with_neuron(cfg: ModelConfig, **changes) -> ModelConfig:
    """``cfg`` with neuron fields replaced, e.g. ``with_neuron(cfg, reset="soft")``."""
    return dataclasses.replace(cfg, neuron=dataclasses.replace(cfg.neuron, **changes))
