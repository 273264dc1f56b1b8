import os
import sys

# Set before torch loads. libgomp's default is to spin while waiting; when other processes share the cores
# (a training run, a test suite), 2-thread torch forward passes ran 19× slower (25 s vs 1.3 s for SmolLM2 on
# 256 tokens). Passive waiting costs little on an idle machine. Only a default: the user's environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from edge_lora.cli import main

sys.exit(main())
