"""The suite's options, markers, Hypothesis profiles and option fixtures live in the pytest plugin
:mod:`lora_parity.suite.plugin`, installed with the package as the ``pytest11`` entry point
``lora_parity`` (so ``--lora-ckpt PATH`` is known before pytest reads the command line).

This file only registers the plugin when the entry point was not loaded (the package not
installed, ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``) and re-exports ``gate_overrides`` for tests that
import it from here.
"""
from __future__ import annotations

from lora_parity.suite.plugin import gate_overrides  # noqa: F401  (``from conftest import gate_overrides``)


def pytest_addhooks(pluginmanager) -> None:
    from lora_parity.suite import plugin

    if not pluginmanager.is_registered(plugin) and not pluginmanager.is_blocked(plugin.NAME):
        pluginmanager.register(plugin, plugin.NAME)
