"""Capacity planning: per-GPU memory, FLOPs and step time of a run (memory), the paper's recipes (recipes),
and the CPU measurement the memory model is checked against (measure)."""
