"""The random streams a run draws from, saved in every checkpoint so a resumed run draws the same.

Python's, numpy's and torch's global generators (CPU and CUDA), stored as tensors and plain
values only, so a checkpoint loads with ``torch.load(weights_only=True)``. timm's ``random_seed``
seeds them; neither timm nor torch saves and restores all of them.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_state(mix_gen: torch.Generator) -> dict:
    """This rank's streams: the global ones and the mixing generator (BatchMixer's boxes)."""
    return {"global": rng_state(), "mix": mix_gen.get_state()}


def set_rank_state(state: dict, mix_gen: torch.Generator) -> None:
    set_rng_state(state["global"])
    mix_gen.set_state(state["mix"])
