"""Stimulus conditions of the demo (``samba-bids-demo --conditions N``): a block design whose
conditions change the band power of some networks, for the stimulus-classification benchmark
(the SAMBA paper's Table II).

The run alternates ``BLOCK_S``-second blocks of ``cond1`` ... ``condN`` in random order with
``rest`` blocks between them. While condition ``c`` is on, the log band power of every coarse
parcel of network ``c`` (networks in sorted order, cycling) rises by ``EFFECT_SD`` log-power
standard deviations in every band, so the condition is visible in the EEG and, through the
neurovascular coupling, in the BOLD. The blocks are written as the fMRI run's
``func/..._events.tsv`` (onsets from the first fMRI volume, ``trial_type`` = condition).
"""

from __future__ import annotations

import numpy as np

from samba_pipeline.simulate.neural import LOG_POWER_SD

BLOCK_S = 20.0
EFFECT_SD = 1.5


def make_blocks(rng: np.random.Generator, n_conditions: int, duration_s: float) -> dict:
    """Condition blocks covering ``duration_s`` s: ``onset``, ``duration``, ``trial_type`` (the
    ``rest`` blocks between conditions are listed too)."""
    if n_conditions < 1:
        raise ValueError("n_conditions must be >= 1")
    names = [f"cond{i + 1}" for i in range(n_conditions)]
    onsets, labels = [], []
    t, k = 0.0, 0
    order = rng.permutation(names)
    while t < duration_s:
        if k == len(order):
            order, k = rng.permutation(names), 0
        onsets.append(t)
        labels.append(str(order[k]))
        k += 1
        t += BLOCK_S
        if t < duration_s:
            onsets.append(t)
            labels.append("rest")
            t += BLOCK_S
    durations = [min(BLOCK_S, duration_s - o) for o in onsets]
    return {"onset": np.asarray(onsets), "duration": np.asarray(durations), "trial_type": labels}


def condition_log_power(blocks: dict, networks: list[str], env_times: np.ndarray, start_s: float,
                        n_bands: int) -> np.ndarray:
    """Log band-power offset ``[n_coarse, n_bands, n_times]`` of the blocks (onsets relative to
    ``start_s`` on the ``env_times`` clock)."""
    net_names = sorted(set(networks))
    net_index = np.array([net_names.index(n) for n in networks])
    offset = np.zeros((len(networks), n_bands, env_times.size))
    for onset, dur, label in zip(blocks["onset"], blocks["duration"], blocks["trial_type"]):
        if not label.startswith("cond"):
            continue
        c = (int(label[4:]) - 1) % len(net_names)
        on = (env_times >= start_s + onset) & (env_times < start_s + onset + dur)
        offset[np.ix_(net_index == c, np.arange(n_bands), np.flatnonzero(on))] += EFFECT_SD * LOG_POWER_SD
    return offset
