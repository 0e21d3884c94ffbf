"""The Ray backend: the driver (``driver.RaySupervisor``) and the actors it starts (``actors``)."""
