"""Entry point: python -m llmjax.main --config=configs/gpt2_124m.py --workdir=DIR [--config.K=V]."""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from llmjax import config, xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, tb/")
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
    from llmjax import checkpoint, data, train  # late: jax starts after the config is known good

    logging.set_verbosity(logging.WARNING)  # Orbax narrates every save at INFO

    try:
        train.train_and_evaluate(cfg, FLAGS.workdir)
    except (data.DataError, checkpoint.CheckpointError) as e:
        print(f"llmjax: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
