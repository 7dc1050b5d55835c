"""Running the pieces together: server processes, many clients with Ray, the demo and sweeps."""
