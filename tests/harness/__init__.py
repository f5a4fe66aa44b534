"""Test-only machinery: CPU patches for Megatron-Core and a multi-rank gloo runner.

Library code never imports from here.
"""
from tests.harness.dist import DistributedTestError, run_distributed

__all__ = ["DistributedTestError", "run_distributed"]
