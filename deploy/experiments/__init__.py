"""Experiments on real processes: the sweep (`split-sweep`), its gains, plots and report, the planner
(`split-plan`) and the demo (`split-demo`)."""
