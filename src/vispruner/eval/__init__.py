"""Accuracy of pruning methods at several token budgets, on the testbed's held-out questions."""
