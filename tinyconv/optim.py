"""Optimizers (SGD with momentum/Nesterov, RMSProp, Adam) and learning-rate schedules.

An optimizer holds the model's ``(name, param, grad)`` triples (``Sequential.named_parameters()``) and updates each
parameter in place with a few vectorized NumPy calls per array, through one shared scratch buffer, so a step
allocates nothing and costs a handful of microseconds per array. SGD runs one kernel pass per array instead, and
one pass over the whole model when the parameters and gradients lie end to end in memory (``Sequential`` lays
them out so); its state buffers are then laid out the same way. Its state (momentum buffers...) is keyed by
parameter name, so it can be saved in a checkpoint and checked against the model when loaded.

Weight decay: applied to kernels and weight matrices (arrays with ndim >= 2), never to batch-norm gamma/beta or
biases (the 1-D arrays). SGD and RMSProp add it to the gradient as an L2 term (``g + wd * p``, coupled, as
``torch.optim.SGD(weight_decay=...)`` and TF-slim's L2 regularizer); Adam decays the weights directly
(``p -= lr * wd * p``, decoupled, as ``torch.optim.AdamW``), because under Adam's per-coordinate scaling an L2
term no longer acts as weight decay (Loshchilov & Hutter, 2019).

Schedules are pure functions of the global step (``LRSchedule``), so resuming needs only the step count.
"""
import math
from dataclasses import dataclass

import numpy as np

from kernels.optim import pieces, sgd_update_unchecked
from tinyconv.io import copy_state

SCHEDULES = ("cosine", "step", "constant")


def decays(param):
    """True if weight decay applies to ``param``: kernels and matrices, not BN gamma/beta or biases (1-D)."""
    return param.ndim >= 2


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _in_range(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value < hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}), got {value!r}")
    return float(value)


class Optimizer:
    """Base class: parameter bookkeeping, per-name state, and state save/load.

    Args:
        params: list of ``(name, param, grad)``, e.g. ``model.named_parameters()``; names must be unique.
        lr: learning rate; the trainer overwrites ``opt.lr`` from its schedule before each step.
        weight_decay: decay coefficient (see the module docstring for how each optimizer applies it).

    Attributes:
        state: ``{param name: {slot: array}}``, the per-parameter buffers.
        steps: number of ``step()`` calls so far.
    """

    kind = "optimizer"
    slots = ()  # names of the per-parameter state arrays

    def __init__(self, params, *, lr, weight_decay=0.0):
        params = list(params)
        if not params:
            raise ValueError("optimizer got no parameters")
        names = [n for n, _, _ in params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique")
        for name, p, g in params:
            if p.shape != g.shape or p.dtype != g.dtype:
                raise ValueError(f"parameter {name}: gradient {g.shape} {g.dtype} does not match {p.shape} {p.dtype}")
        self.params = params
        self.lr = _positive("lr", lr)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)
        self.steps = 0
        self._decay = {name: self.weight_decay if decays(p) else 0.0 for name, p, _ in params}
        # Parameters and gradients laid end to end (tinyconv.Sequential packs them): the whole model as one array
        # each, and the state slots laid out the same way, so that a step can be one kernel call.
        flat_p, flat_g = _end_to_end([p for _, p, _ in params]), _end_to_end([g for _, _, g in params])
        self._flat = (flat_p, flat_g) if flat_p is not None and flat_g is not None else None
        if self._flat is not None:
            self._flat_state = {s: np.zeros_like(flat_p) for s in self.slots}
            self.state, offset = {}, 0
            for name, p, _ in params:
                self.state[name] = {s: flat[offset:offset + p.size].reshape(p.shape)
                                    for s, flat in self._flat_state.items()}
                offset += p.size
        else:
            self.state = {name: {s: np.zeros_like(p) for s in self.slots} for name, p, _ in params}
        # Two scratch arrays shared by every parameter (sized to the largest, per dtype): steps allocate nothing.
        self._scratch = {}
        for _, p, _ in params:
            if self._scratch.get(p.dtype, np.empty(0)).size < 2 * p.size:
                self._scratch[p.dtype] = np.empty(2 * p.size, p.dtype)

    def _tmps(self, p):
        flat = self._scratch[p.dtype]
        return flat[:p.size].reshape(p.shape), flat[p.size:2 * p.size].reshape(p.shape)

    def step(self):
        """Update every parameter in place from its gradient, with the current ``self.lr``."""
        self.steps += 1
        for name, p, g in self.params:
            self._update(p, g, self.state[name], self._decay[name], *self._tmps(p))

    def _update(self, p, g, state, wd, tmp, tmp2):
        """Update one parameter in place; ``tmp`` and ``tmp2`` are scratch arrays shaped like ``p``."""
        raise NotImplementedError

    def hyperparameters(self):
        """The constructor's keyword arguments, for the checkpoint's config."""
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def state_dict(self):
        """Flat ``{'<param name>/<slot>': array}`` plus ``'steps'`` (a 0-d int64), ready for ``np.savez``."""
        out = {f"{name}/{slot}": arr.copy() for name, slots in self.state.items() for slot, arr in slots.items()}
        out["steps"] = np.array(self.steps, np.int64)
        return out

    def load_state_dict(self, state):
        """Restore buffers saved by ``state_dict``; names and shapes must match this optimizer's parameters.

        Raises:
            ValueError: naming the missing, unexpected or mis-shaped entries.
        """
        want = {f"{name}/{slot}": arr for name, slots in self.state.items() for slot, arr in slots.items()}
        if "steps" not in state:
            raise ValueError(f"{self.kind} state does not match the parameters: missing ['steps']")
        copy_state(want, {k: v for k, v in state.items() if k != "steps"}, what=f"the {self.kind} optimizer")
        self.steps = int(state["steps"])

    def __repr__(self):
        hyper = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({hyper}, params={len(self.params)})"


def _end_to_end(arrays):
    """The 1-D view covering ``arrays`` if they lie end to end, in order, in one array's memory (C-contiguous, one
    dtype, no gaps), else None."""
    base = arrays[0].base
    if base is None or any(a.base is not base or not a.flags.c_contiguous or a.dtype != base.dtype
                           for a in arrays) or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    start = base.__array_interface__["data"][0]
    item = base.itemsize
    offset = (arrays[0].__array_interface__["data"][0] - start) // item
    first = offset
    for a in arrays:
        if a.size and a.__array_interface__["data"][0] != start + offset * item:
            return None
        offset += a.size
    return base[first:offset]


class SGD(Optimizer):
    """SGD with momentum, optionally Nesterov, exactly as ``torch.optim.SGD`` (dampening 0).

    With ``g = grad + wd * p`` and momentum ``mu``::

        buf = mu * buf + g
        p  -= lr * (g + mu * buf)      # Nesterov
        p  -= lr * buf                 # classical momentum
    """

    kind = "sgd"
    slots = ("momentum",)

    def __init__(self, params, *, lr, momentum=0.9, nesterov=True, weight_decay=0.0):
        self.momentum = _in_range("momentum", momentum, 0.0, 1.0)
        if nesterov and self.momentum == 0.0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.nesterov = bool(nesterov)
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        if self._flat is not None:
            self._layout = pieces([p.size for _, p, _ in self.params], [self._decay[n] for n, _, _ in self.params],
                                  self._flat[0].dtype)
        else:
            # per array, keyed by the array's id (the optimizer holds every array, so ids stay theirs)
            self._layouts = {id(p): pieces((p.size,), (self._decay[name],), p.dtype) for name, p, _ in self.params}

    def step(self):
        if self._flat is None:
            return super().step()
        # every parameter in one kernel call, the same arithmetic per value as one call per array
        self.steps += 1
        p, g = self._flat
        sgd_update_unchecked(p, g, self._flat_state["momentum"], self._layout, lr=self.lr, momentum=self.momentum,
                             nesterov=self.nesterov)

    def _update(self, p, g, state, wd, tmp, tmp2):
        buf = state["momentum"]
        if p.flags.c_contiguous and g.flags.c_contiguous:
            # one kernel pass, bitwise the NumPy formula below (tested), ~4x fewer calls per step
            sgd_update_unchecked(p, g, buf, self._layouts[id(p)], lr=self.lr, momentum=self.momentum,
                                 nesterov=self.nesterov)
            return
        mu, lr = self.momentum, self.lr
        np.multiply(p, wd, out=tmp)
        tmp += g                       # tmp = g + wd * p
        buf *= mu
        buf += tmp                     # buf = mu * buf + g
        if self.nesterov:
            tmp *= lr
            p -= tmp                   # p -= lr * g
            np.multiply(buf, lr * mu, out=tmp)
            p -= tmp                   # p -= lr * mu * buf
        else:
            np.multiply(buf, lr, out=tmp)
            p -= tmp

    def hyperparameters(self):
        return {**super().hyperparameters(), "momentum": self.momentum, "nesterov": self.nesterov}


class RMSProp(Optimizer):
    """RMSProp with momentum as TensorFlow 1's ``RMSPropOptimizer``, which the MobileNet paper trained with.

    With ``g = grad + wd * p``::

        ms  = rho * ms + (1 - rho) * g**2          # ms starts at 1, as in TF 1
        mom = mu * mom + lr * g / sqrt(ms + eps)
        p  -= mom

    Defaults are TF-slim's ``train_image_classifier`` flags (decay 0.9, momentum 0.9, epsilon 1.0); the large
    epsilon keeps early steps close to momentum SGD. Unlike ``torch.optim.RMSprop``, epsilon sits inside the
    square root and the learning rate inside the momentum buffer.
    """

    kind = "rmsprop"
    slots = ("ms", "mom")

    def __init__(self, params, *, lr, rho=0.9, momentum=0.9, eps=1.0, weight_decay=0.0):
        self.rho = _in_range("rho", rho, 0.0, 1.0)
        self.momentum = _in_range("momentum", momentum, 0.0, 1.0)
        self.eps = _positive("eps", eps)
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        for slots in self.state.values():
            slots["ms"].fill(1.0)

    def _update(self, p, g, state, wd, tmp, tmp2):
        ms, mom = state["ms"], state["mom"]
        np.multiply(p, wd, out=tmp)
        tmp += g                       # tmp = g
        ms *= self.rho
        np.square(tmp, out=tmp2)
        tmp2 *= 1.0 - self.rho
        ms += tmp2                     # ms = rho * ms + (1 - rho) * g**2
        np.add(ms, self.eps, out=tmp2)
        np.sqrt(tmp2, out=tmp2)
        tmp *= self.lr
        tmp /= tmp2                    # tmp = lr * g / sqrt(ms + eps)
        mom *= self.momentum
        mom += tmp
        p -= mom

    def hyperparameters(self):
        return {**super().hyperparameters(), "rho": self.rho, "momentum": self.momentum, "eps": self.eps}


class Adam(Optimizer):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``::

        p -= lr * wd * p
        m  = b1 * m + (1 - b1) * g ;  v = b2 * v + (1 - b2) * g**2
        p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)
    """

    kind = "adam"
    slots = ("m", "v")

    def __init__(self, params, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.beta1 = _in_range("beta1", beta1, 0.0, 1.0)
        self.beta2 = _in_range("beta2", beta2, 0.0, 1.0)
        self.eps = _positive("eps", eps)
        super().__init__(params, lr=lr, weight_decay=weight_decay)

    def step(self):
        t = self.steps + 1
        self._c1 = 1.0 - self.beta1 ** t
        self._c2 = 1.0 - self.beta2 ** t
        super().step()

    def _update(self, p, g, state, wd, tmp, tmp2):
        m, v, lr = state["m"], state["v"], self.lr
        if wd:
            p *= 1.0 - lr * wd
        m *= self.beta1
        np.multiply(g, 1.0 - self.beta1, out=tmp)
        m += tmp
        v *= self.beta2
        np.square(g, out=tmp)
        tmp *= 1.0 - self.beta2
        v += tmp
        np.divide(v, self._c2, out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp += self.eps                # tmp = sqrt(v_hat) + eps
        np.divide(m, tmp, out=tmp)
        tmp *= lr / self._c1           # tmp = lr * m_hat / (sqrt(v_hat) + eps)
        p -= tmp

    def hyperparameters(self):
        return {**super().hyperparameters(), "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}


OPTIMIZERS = {"sgd": SGD, "rmsprop": RMSProp, "adam": Adam}


def make_optimizer(kind, params, **hyper):
    """Build the optimizer named ``kind`` ('sgd', 'rmsprop' or 'adam') with keyword hyperparameters."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {kind!r}")
    return OPTIMIZERS[kind](params, **hyper)


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the global step (0-based), with a linear warm-up.

    Kinds:
        constant: ``lr`` after warm-up.
        cosine:   ``lr * (1 + cos(pi * t)) / 2`` with t going from 0 to 1 over the post-warm-up steps (to 0).
        step:     ``lr``, times ``gamma`` at each milestone, milestones at fractions of the total steps.

    Warm-up: step ``s < warmup_steps`` uses ``lr * (s + 1) / warmup_steps``, reaching ``lr`` on its last step.
    """

    kind: str
    lr: float
    total_steps: int
    warmup_steps: int = 0
    milestones: tuple = (0.5, 0.75)
    gamma: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.kind!r}")
        _positive("lr", self.lr)
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")

    def __call__(self, step):
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            t = min((step - self.warmup_steps) / span, 1.0)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * t))
        passed = sum(step >= round(f * self.total_steps) for f in self.milestones)
        return self.lr * self.gamma ** passed
