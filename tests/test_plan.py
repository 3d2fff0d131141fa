"""The training loop's plan, checked over a table of cadences without running JAX."""

import itertools

import pytest

from jax_mnist.plan import plan_chunks

CADENCES = [
    # steps per epoch, epochs, log every, checkpoint every (epochs), checkpoint every (steps)
    (16, 2, 8, 1, 0),
    (16, 2, 8, 1, 5),  # checkpoints between log points
    (16, 3, 5, 2, 7),
    (10, 3, 100, 1, 0),  # log interval longer than an epoch
    (13, 2, 4, 3, 4),
    (7, 4, 1, 1, 3),
    (100, 2, 30, 1, 45),
    (16, 1.5, 5, 1, 0),  # a last epoch of half the steps
    (10, 2.25, 4, 2, 3),
    (16, 0.25, 8, 1, 0),  # less than one epoch
]


@pytest.mark.parametrize(("spe", "epochs", "log_every", "ckpt_epochs", "ckpt_steps"), CADENCES)
@pytest.mark.parametrize("start_fraction", [0.0, 0.3, 0.5])
def test_chunks_cover_the_run_and_stop_where_the_host_must_act(
    spe, epochs, log_every, ckpt_epochs, ckpt_steps, start_fraction
):
    total = round(spe * epochs)
    start = int(start_fraction * total)
    # Where each epoch ends: whole epochs, and the last step of a run that ends part way.
    epoch_ends = {e * spe for e in range(1, total // spe + 1)} | {total}
    chunks = list(
        plan_chunks(
            start,
            total,
            spe,
            log_every=log_every,
            checkpoint_every=ckpt_epochs,
            checkpoint_every_steps=ckpt_steps,
        )
    )
    # Contiguous, from start to the end, each inside one epoch.
    assert chunks[0].start == start and chunks[-1].end == total
    for a, b in itertools.pairwise(chunks):
        assert a.end == b.start
    for c in chunks:
        assert c.num_steps >= 1
        assert c.epoch == c.start // spe == (c.end - 1) // spe

    # Log points: every log_every steps into each epoch, and each epoch's end.
    expected_logs = {
        e * spe + p for e in range(total // spe + 1) for p in range(1, spe + 1) if p % log_every == 0
    } & set(range(total + 1)) | epoch_ends
    assert {c.end for c in chunks if c.log} == {s for s in expected_logs if s > start}
    # Epoch ends, and checkpoints: by epoch cadence, by step cadence, and the last step.
    assert {c.end for c in chunks if c.epoch_end} == {s for s in epoch_ends if s > start}
    expected_saves = {e * spe for e in range(1, total // spe + 1) if e % ckpt_epochs == 0} | {total}
    if ckpt_steps:
        expected_saves |= set(range(ckpt_steps, total + 1, ckpt_steps))
    assert {c.end for c in chunks if c.checkpoint} == {s for s in expected_saves if s > start}
    # No chunk runs past a point where the host must log, evaluate or save.
    stops = expected_logs | expected_saves | epoch_ends
    for c in chunks:
        assert not any(c.start < s < c.end for s in stops)


def test_every_step_is_in_exactly_one_logged_interval():
    # Checkpoints every 5 steps, logs every 8: the log at step 8 covers steps 0-7, though a
    # chunk ends at step 5 for the checkpoint in between.
    chunks = list(plan_chunks(0, 32, 16, log_every=8, checkpoint_every_steps=5))
    covered, pending = [], []
    for c in chunks:
        pending.extend(range(c.start, c.end))
        if c.log:
            covered.append((pending[0], pending[-1]))
            pending = []
    assert covered == [(0, 7), (8, 15), (16, 23), (24, 31)]
    assert [c.end for c in chunks] == [5, 8, 10, 15, 16, 20, 24, 25, 30, 32]
