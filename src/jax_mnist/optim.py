"""The optimizer and learning-rate schedule a config asks for, built from optax."""

from __future__ import annotations

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


def create_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation for ``config``: clipping, weight decay, optimizer, schedule."""
    lr = create_schedule(config, steps_per_epoch)
    wd = config.weight_decay
    if config.optimizer == "adamw":
        opt = optax.adamw(lr, weight_decay=wd, mask=_decay_mask)
    elif config.optimizer == "lion":
        opt = optax.lion(lr, weight_decay=wd, mask=_decay_mask)
    else:
        if config.optimizer == "adam":
            opt = optax.adam(lr)
        elif config.optimizer == "sgd":
            opt = optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov)
        else:
            opt = optax.rmsprop(lr, momentum=config.momentum)
        if wd > 0:
            opt = optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask), opt)
    if config.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
    return opt
