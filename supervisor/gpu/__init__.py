"""GPU health: sensors (NVML, scripted) the supervisor polls."""
