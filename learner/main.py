"""``python -m learner.main``: one learner rank (the launcher starts world_size of these).

Rank, world size and rendezvous come from the usual torch.distributed
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
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

    # Start-up (torch, transformers, the model, FSDP: ~400k tracked objects that live as long as the
    # process) runs without the cyclic collector: its full passes over them took 1.7-1.9 s of the
    # start here (7 passes, up to 0.4 s each). One pass at the end (0.6-0.9 s; it finds ~14k
    # unreachable objects), then they are frozen: passes during training skip them
    gc.disable()
    import torch

    from configs.loader import load_config
    from learner.prompts import load_prompts
    from learner.trainer import Trainer

    torch.set_num_threads(args.threads)
    cfg = load_config([args.config])
    rows = load_prompts(cfg, cfg.data.train_files, "train")
    trainer = Trainer(cfg, rows)
    trainer.setup()
    gc.collect()
    gc.freeze()
    gc.enable()
    trainer.train()
    trainer.cleanup()
    logging.info("learner rank %d done at v%d", rank, trainer.version)
    return 0


if __name__ == "__main__":
    from protocol.transport import exit_closed

    exit_closed(main())
