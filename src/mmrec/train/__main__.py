"""``python -m mmrec.train [options]``: the same as ``mmrec train``; the entry point for torchrun.

torchrun --nproc_per_node 2 -m mmrec.train --max-steps 100 --out runs/ddp
"""

import sys

from mmrec.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
