"""``python -m learner.main``: one learner rank (the launcher starts world_size of these).

Rank, world size and rendezvous come from the usual torch.distributed
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one Relay learner rank.")
    ap.add_argument("--config", required=True, help="resolved config YAML written by the launcher")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher's stall watchdog asks for our stacks
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s learner-{rank} %(levelname)s %(message)s")

    import torch

    from configs.loader import load_config
    from learner.prompts import load_prompts
    from learner.trainer import Trainer

    torch.set_num_threads(args.threads)
    cfg = load_config([args.config])
    rows = load_prompts(cfg, cfg.data.train_files, "train")
    trainer = Trainer(cfg, rows)
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    logging.info("learner rank %d done at v%d", rank, trainer.version)
    return 0


if __name__ == "__main__":
    from protocol.transport import exit_closed

    exit_closed(main())
