"""Shared pytest setup: run JAX on the CPU so results do not depend on an attached accelerator."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
