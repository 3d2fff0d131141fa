"""The optimizer and learning-rate schedule a config asks for, built from optax."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax

from jax_mnist.config import Config


def create_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate as a function of the global step."""
    total_steps = config.total_steps(steps_per_epoch)
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    lr = config.lr
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, lr)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1))
    if config.schedule == "step":
        main = optax.piecewise_constant_schedule(
            lr, {int(0.5 * total_steps): 0.1, int(0.75 * total_steps): 0.1}
        )
    else:
        main = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def _decay_mask(params):
    # Weight decay on kernels only: decaying biases and normalization scales only hurts.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _sgd(
    learning_rate: optax.ScalarOrSchedule, momentum: float, nesterov: bool
) -> optax.GradientTransformation:
    # Momentum 0 is plain SGD, with no momentum trace in the optimizer's state.
    return optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """One ``--optimizer``: its optax constructor and the :class:`Config` fields it reads.

    ``make(learning_rate, **{field: config.field for field in reads})``; an optimizer with
    ``decoupled_decay`` reads ``weight_decay`` itself and takes the kernels-only mask, the
    others get ``weight_decay`` as L2 added to the gradient before them.
    """

    make: Callable[..., optax.GradientTransformation]
    reads: tuple[str, ...] = ()
    decoupled_decay: bool = False


OPTIMIZERS: dict[str, Optimizer] = {
    "adam": Optimizer(optax.adam, ("b1", "b2")),
    "adamw": Optimizer(optax.adamw, ("b1", "b2", "weight_decay"), decoupled_decay=True),
    "sgd": Optimizer(_sgd, ("momentum", "nesterov")),
    "rmsprop": Optimizer(optax.rmsprop, ("momentum",)),
    "lion": Optimizer(optax.lion, ("weight_decay",), decoupled_decay=True),
}


def create_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation for ``config``: clipping, weight decay, optimizer, schedule."""
    entry = OPTIMIZERS[config.optimizer]
    settings = {name: getattr(config, name) for name in entry.reads}
    if entry.decoupled_decay:
        opt = entry.make(create_schedule(config, steps_per_epoch), **settings, mask=_decay_mask)
    else:
        opt = entry.make(create_schedule(config, steps_per_epoch), **settings)
        if config.weight_decay > 0:
            opt = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask), opt)
    if config.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
    return opt
