"""``gdn2-pretrain``: pretrain a GDN-2 model with Megatron-Core (see ``arguments`` for the flags).

Launch::

    gdn2-pretrain ...                                   # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 -m megatron_gdn2.training.pretrain ...
    srun --ntasks-per-node 8 python -m megatron_gdn2.training.pretrain ...   # Slurm (RANK etc.
                                                       # from SLURM_* must be exported as torchrun's)

The flags are parsed and checked before Megatron is imported, so ``--help`` and most bad-input
errors come back in about a second; the run itself is ``runner.run``.

Exit status:

- 0: training finished (or was already finished: resuming a run at its last iteration does
  nothing), or stopped after saving by ``--exit-interval`` / ``--exit-duration-mins``;
- ``--signal-exit-code`` (default 0): SIGTERM or SIGUSR1 received; a checkpoint was saved at the
  next step boundary. Requeue and rerun the same command to continue;
- 2: bad input (a message names the flag or file), nothing was trained;
- 3: ``--max-nonfinite-steps`` non-finite steps in a row; the last good state was saved;
- 1: any other error (traceback).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

from megatron_gdn2.training.arguments import config_from_args
from megatron_gdn2.training.config import ConfigError

__all__ = ["EXIT_BAD_INPUT", "EXIT_DIVERGED", "configure_logging", "main"]

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # Megatron warns at import time about optional fused kernels (Apex, TE) and deprecations that
    # concern its own callers; they say nothing actionable to a gdn2-pretrain user.
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\.")


def _bad_input(error: Exception) -> int:
    print(f"gdn2-pretrain: error: {error}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        cfg = config_from_args(argv)
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        return _bad_input(e)
    from megatron_gdn2.training.loop import DivergenceError
    from megatron_gdn2.training.runner import run

    try:
        result = run(cfg)
    except ConfigError as e:
        return _bad_input(e)
    except DivergenceError as e:
        print(f"gdn2-pretrain: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    return cfg.checkpoint.signal_exit_code if result.exit_reason == "signal" else 0


if __name__ == "__main__":
    sys.exit(main())
