"""Entry point: python -m llmjax.main --config=configs/gpt2_124m.py --workdir=DIR [--config.K=V].

Several processes (hosts): add --coordinator_address=HOST:PORT --num_processes=N --process_id=I,
or launch under SLURM srun / Open MPI, which jax.distributed detects (see launch/README.md).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from llmjax import config, xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, tb/")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (jax.distributed)")
flags.DEFINE_integer("num_processes", None, "processes in the run (jax.distributed)")
flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1 (jax.distributed)")
flags.mark_flags_as_required(["config", "workdir"])


def _parse(argv: list[str]) -> list[str]:
    # absl reports a bad flag with a usage dump and exit 1; users get one line and exit 2.
    try:
        return FLAGS(argv)
    except (flags.Error, KeyError, TypeError, ValueError, AttributeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"llmjax: {msg}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    del argv
    xla_flags.apply()  # GPU only; must precede the first use of a device
    cfg = FLAGS.config
    try:
        config.validate(cfg)
    except config.ConfigError as e:
        print(f"llmjax: config: {e}", file=sys.stderr)
        sys.exit(2)
    # late: jax starts after the config is known good
    from llmjax import checkpoint, data, sharding, train

    logging.set_verbosity(logging.WARNING)  # Orbax narrates every save at INFO
    try:
        sharding.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        # After jax.distributed: with several processes, a signal to one stops all at one step.
        checkpoint.handle_signals()  # SIGTERM/SIGINT: finish the step, save, exit 0
        train.train_and_evaluate(cfg, FLAGS.workdir)
    except (config.ConfigError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"llmjax: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # diverged; the last good checkpoint is on disk
        print(f"llmjax: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
