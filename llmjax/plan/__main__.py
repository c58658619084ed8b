"""python -m llmjax.plan: the command line of llmjax/plan/__init__.py."""

from llmjax import errors, plan

__doc__ = plan.__doc__  # what absl's --help prints: the program's usage, kept in the package
plan.define_flags()
errors.run(plan.main)
