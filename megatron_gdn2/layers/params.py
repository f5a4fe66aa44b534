"""Parameters the GDN-2 layers create themselves, placed the way Megatron places its own."""
from __future__ import annotations

import torch


def new_parameter(config, *shape: int, fill: float | None = None) -> torch.nn.Parameter:
    """A parameter of `shape` in config.params_dtype, on the CPU under use_cpu_initialization (the
    model is moved later) and on the current GPU otherwise; uninitialised unless `fill` is given."""
    device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
    data = torch.empty(*shape, dtype=config.params_dtype, device=device)
    if fill is not None:
        data.fill_(fill)
    return torch.nn.Parameter(data)
