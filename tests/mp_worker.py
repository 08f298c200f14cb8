"""One process of a multi-process test job (started by launch/local.py).

python -m tests.mp_worker train DATA RUN_DIR [KEY=VALUE ...]
python -m tests.mp_worker die-at STEP DATA RUN_DIR [KEY=VALUE ...]   # process 1 is killed
python -m tests.mp_worker score DATA RUN_DIR OUT [KEY=INT ...]
"""

import os
import signal
import sys

import jax

from tests.service_helpers import small_config
from train import checkpoint, loop


def kill_process_one_at(step: int) -> None:
    """SIGKILL process 1 when the job reaches the checkpoint of ``step`` (before writing it),
    as a machine failure would: no handler runs, nothing is flushed."""
    save = checkpoint.Checkpointer.save

    def save_or_die(self, at, *args, **kwargs):
        if at == step and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, at, *args, **kwargs)

    checkpoint.Checkpointer.save = save_or_die


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "die-at":
        kill_process_one_at(int(args.pop(0)))
        mode = "train"
    if mode == "train":
        data, run_dir, *pairs = args
        overrides = {"mesh.data": 2, "mesh.model": 4}
        for pair in pairs:
            key, _, value = pair.partition("=")
            overrides[key] = int(value) if value.isdigit() else value
        cfg = small_config(data, run_dir, **overrides)
        print(loop.train(cfg, log=print))
    else:
        from tests.test_score import score_cfg
        from train import score

        data, run_dir, out, *pairs = args
        overrides = {k: int(v) for k, _, v in (p.partition("=") for p in pairs)}
        score.score(score_cfg(run_dir, data, out, **overrides), log=print)
