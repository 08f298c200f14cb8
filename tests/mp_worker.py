"""One process of a multi-process test job (started by launch/local.py)."""

import sys

from tests.service_helpers import small_config
from train import loop

if __name__ == "__main__":
    mode, data, run_dir = sys.argv[1:4]
    if mode == "train":
        cfg = small_config(data, run_dir, **{"mesh.data": 2, "mesh.model": 4})
        print(loop.train(cfg, log=print))
    else:
        from tests.test_score import score_cfg
        from train import score

        score.score(score_cfg(run_dir, data, sys.argv[4]), log=print)
