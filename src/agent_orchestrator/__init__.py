"""Agent Orchestrator Service."""
