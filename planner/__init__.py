"""The memory planner: what a deployment holds on a device, dense and CoreMatching (torch-free; docs/planning.md)."""
