"""Test and benchmark helpers, kept out of the installed package (setuptools finds packages under src/ only).

Tests import them as ``tests.support.*`` (pytest puts the repository's root on ``sys.path``, as
``tests`` is a package); ``python -m benchmarks`` run from the repository's root imports them the same way.

- :mod:`tests.support.grid`: :class:`~tests.support.grid.LocalGrid`, an in-process Flower ``Grid`` (needs flwr).
- :mod:`tests.support.processes`: loopback SuperLink wait, free ports, the /proc process walk.
"""
