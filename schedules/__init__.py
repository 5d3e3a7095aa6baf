"""PSB kernels (TE/TIR) and their schedules per target."""
