"""Sub-commands of the ``cpsam`` CLI; each module has ``register(subparsers)``."""
