"""Retry policy, circuit breakers and bulkheads for downstream calls."""
