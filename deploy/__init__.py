"""Running the pieces together, in rooms (docs/ARCHITECTURE.md §7): `deploy.sim`, many edge clients
on Ray (`split-ray`); `deploy.experiments`, sweeps, their report, the planner and the demo; beside
them `deploy.processes` (the programs as child processes) and `deploy.link` (`split-link`)."""
