"""Test-only machinery: a multi-rank gloo runner for Megatron-Core on CPU.

Library code never imports from here.
"""
from tests.harness.dist import DistributedTestError, run_distributed

__all__ = ["DistributedTestError", "run_distributed"]
