"""Family: recursion — units run a per-input number of times (ACT halting, weight-shared iteration)."""

from dynnet.methods.recursion import act, dynamic_recursive, iamnn

__all__ = ["act", "dynamic_recursive", "iamnn"]
