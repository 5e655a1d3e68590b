"""Sub-commands of the `quantscale` CLI, one module each, each exposing `register(subparsers)`."""
