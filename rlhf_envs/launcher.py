"""The ``rlhf`` console script: checks that ``agents`` is this project's package, then runs :func:`agents.cli.main`.

The project's trainers live in a top-level package named ``agents``; so does the ``openai-agents``
distribution, and pip does not catch the clash (both install ``site-packages/agents``). Without
this check a clash surfaces as ``ModuleNotFoundError: No module named 'agents.cli'`` or worse.
This module lives outside ``agents`` so that it can still run, and say so, when the name is taken.
"""

from __future__ import annotations

import importlib
import sys

MARKER = "__rlhf_gym__"
"""Set to True in this project's ``agents/__init__.py``; a foreign ``agents`` package lacks it."""


def foreign_agents_message(module) -> str | None:
    """``None`` when ``module`` is this project's ``agents`` package, else the message to show."""
    if getattr(module, MARKER, False):
        return None
    where = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
    return (f"rlhf: the Python package 'agents' at {where} is not rlhf-gym's (another distribution, often "
            "openai-agents, installs a top-level 'agents' package too). Uninstall it (`pip uninstall openai-agents`) "
            "or install rlhf-gym into a virtual environment of its own, then run rlhf again.")


def main(argv: list[str] | None = None) -> int:
    try:
        agents = importlib.import_module("agents")
    except ImportError as error:  # a broken foreign package may fail to import at all
        print(f"rlhf: cannot import the 'agents' package ({error}); reinstall rlhf-gym with `pip install -e .`.",
              file=sys.stderr)
        return 2
    message = foreign_agents_message(agents)
    if message:
        print(message, file=sys.stderr)
        return 2
    from agents.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
