"""Deploying crfl's Flower app fast: programs that patch or reimplement Flower 1.41 internals.

:mod:`crfl.flower` is the app, written against Flower's public API (``ServerApp``,
``ClientApp``, strategies, records). This subpackage is the machinery around it for
deployments on a small machine, where Flower's fixed waits and its process per message, not
the clients' training, set the round time. It reaches into Flower's internals (the SuperNode
loop, the Runtime and Fleet HTTP APIs), checks that the code it adjusts is flwr 1.41.0's and
otherwise leaves it alone or says so. The app uses one piece of it: the ServerApp shortens
the object retry of Flower's deployment Grid with :func:`crfl.flower.deploy.waits.shorten_object_backoff`.

- :mod:`crfl.flower.deploy.nodes`: ``python -m crfl.flower.deploy.nodes``, several deployed
  nodes in one process, each with its own Fleet connection and key, running the ClientApp
  in-process (the fastest deployment). **One process is one trust domain**: the ClientApp
  runs in the process that holds every hosted node's private key, so host several keys in one
  process only for nodes of one operator.
- :mod:`crfl.flower.deploy.supernode`: ``python -m crfl.flower.deploy.supernode``, Flower's own
  ``flower-supernode`` with shorter waits (TLS and authentication stay Flower's).
- :mod:`crfl.flower.deploy.worker`: ``python -m crfl.flower.deploy.worker``, a long-lived
  ClientApp process serving SuperNodes started with ``--isolation process``.
- :mod:`crfl.flower.deploy.waits`: Flower's fixed waits on the path of a deployed round, and
  crfl's shorter ones; the adjustments touch only timing, never what is sent or who may send it.

See docs/flower.md for the commands, the measured round times and the trust domains.
"""
