"""Entry point: python -m llmjax.main --config=configs/gpt2_124m.py --workdir=DIR [--config.K=V].

Several processes (hosts): add --coordinator_address=HOST:PORT --num_processes=N --process_id=I,
or launch under SLURM srun / Open MPI, which jax.distributed detects (see launch/README.md).
"""

from __future__ import annotations

import atexit
import logging as std_logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from llmjax import config, errors, xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, tb/")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (jax.distributed)")
flags.DEFINE_integer("num_processes", None, "processes in the run (jax.distributed)")
flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1 (jax.distributed)")
flags.mark_flags_as_required(["config", "workdir"])
_finished: list[int] = []  # the exit code, once the run has ended and everything is written


def _exit_without_teardown() -> None:
    """The last exit handler: a finished run leaves without Python's own teardown of XLA's,
    Orbax's and Grain's objects, which took 2.5 s of a SIGTERM's 6.4 s on a loaded 2-core machine
    (a preemption's grace period should not pay for it). Registered before jax is imported, so it
    runs after jax's handlers (jax.distributed's shutdown among them) and every library's."""
    if _finished:
        std_logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_finished[0])


atexit.register(_exit_without_teardown)


def main(argv: list[str]) -> None:
    del argv
    xla_flags.apply()  # GPU only; must precede the first use of a device
    cfg = FLAGS.config
    config.validate(cfg)  # a UserError: one line, exit code 2 (errors.run)
    # late: jax starts after the config is known good
    from llmjax import checkpoint, guard, init_from, metrics, sharding, train

    sharding.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    adopted = init_from.adopt_architecture(cfg, config.overrides(sys.argv[1:]))
    if adopted:  # the model's shape comes from model.init_from
        config.validate(cfg)
        metrics.console(adopted)
    # After jax.distributed: with several processes, a signal to one stops all at one step.
    checkpoint.handle_signals()  # SIGTERM/SIGINT: finish the step, save, exit 0
    # The workdir's lock, errors.log, and one line (a diverged run: exit code 1) for any failure.
    name = os.path.basename(config_flags.get_config_filename(FLAGS["config"]))
    with guard.trainer(FLAGS.workdir, cfg):
        train.train_and_evaluate(cfg, FLAGS.workdir, os.path.splitext(name)[0])
    _finished.append(0)


if __name__ == "__main__":
    errors.run(main)
