"""A KV cache allocated once per decode batch, with a length of its own for every row.

Rows of one batch have prompts of different lengths and finish at different steps, so a cache with
one shared position (HF's StaticCache, DynamicCache) would need padding and position bookkeeping
around it. Here row b's keys live in slots [0, lengths[b]) of one [B, heads, capacity, dim] tensor
per layer: a decode step writes each row's new key at its own slot, and attention sees only the
slots below the row's length through an explicit mask (so padding never changes a row's result).

HF decoder layers only call `cache.update(key, value, layer_idx, ...)` when the model is given
position ids and a ready mask mapping, which is all this class implements.
"""

from __future__ import annotations

from typing import Any

import torch


class RowCache:
    """Per-layer K/V slots for a batch of rows; filled from per-request prefill caches."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.int64, device=device)
        # The same lengths on the host, so a step's attention width never waits on the device.
        self.host_lengths: list[int] = []
        self._width = 0

    def fill(self, prefills: list[tuple[Any, int]]) -> None:
        """Allocate the slots and copy every request's prompt K/V into its rows.

        prefills: (HF DynamicCache of one prompt, number of rows that share it), in row order; rows
        sharing a prompt (num_samples) get copies of the one prefill.
        """
        rows = sum(n for _, n in prefills)
        first = prefills[0][0].layers
        for layer in range(len(first)):
            k0, v0 = first[layer].keys, first[layer].values
            keys = k0.new_zeros(rows, k0.shape[1], self.capacity, k0.shape[3])
            values = v0.new_zeros(rows, v0.shape[1], self.capacity, v0.shape[3])
            row = 0
            for cache, n in prefills:
                k, v = cache.layers[layer].keys, cache.layers[layer].values
                keys[row : row + n, :, : k.shape[2]] = k[0]
                values[row : row + n, :, : v.shape[2]] = v[0]
                row += n
            self.keys.append(keys)
            self.values.append(values)
        self.host_lengths = [c.layers[0].keys.shape[2] for c, n in prefills for _ in range(n)]
        self.lengths = torch.tensor(self.host_lengths, dtype=torch.int64, device=self.device)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows at `index` (finished rows leave the batch)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.lengths = self.lengths.index_select(0, index)
        self.host_lengths = [self.host_lengths[i] for i in index.tolist()]

    def step_mask(self, width: int, dtype: torch.dtype, eager: bool, window: int | None = None) -> torch.Tensor:
        """The decode step's attention mask [B, 1, 1, width], the new token's slot included.

        Slot i holds position i, so a sliding window keeps slots above the new position - window.
        sdpa and friends take a boolean mask (True attends); eager attention adds a float mask.
        """
        slots = torch.arange(width, device=self.device)[None, :]
        seen = slots <= self.lengths[:, None]
        if window:
            seen &= slots > self.lengths[:, None] - window
        mask = seen[:, None, None, :]
        if not eager:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)

    def advance(self) -> None:
        self.lengths += 1
        self.host_lengths = [n + 1 for n in self.host_lengths]

    # -- what HF attention layers call ------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new token per row at the row's own slot; return the slots in use."""
        rows = torch.arange(key_states.shape[0], device=self.device)
        self.keys[layer_idx][rows, :, self.lengths] = key_states[:, :, 0]
        self.values[layer_idx][rows, :, self.lengths] = value_states[:, :, 0]
        width = self.width()
        return self.keys[layer_idx][:, :, :width], self.values[layer_idx][:, :, :width]

    def width(self) -> int:
        """Slots attention needs this step: up to the longest row, its new token included."""
        return self._width

    def begin_step(self) -> int:
        """Fix this step's width (the mask and every layer's slice share it)."""
        self._width = max(self.host_lengths) + 1
        return self._width

    def full_width(self) -> None:
        """Attend over every slot from now on (the static decode step, decode_graph.py, over views of
        the buffers decode_state.py keeps): the width never changes, and the mask hides the slots at
        or above each row's length + 1."""
        self._width = self.capacity

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width - 1
