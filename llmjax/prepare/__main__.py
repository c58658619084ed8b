"""python -m llmjax.prepare: the command line of llmjax/prepare/__init__.py."""

from llmjax import errors, prepare

__doc__ = prepare.__doc__  # what absl's --help prints: the program's usage, kept in the package
prepare.define_flags()
errors.run(prepare.main)
