"""The local backend: one machine, multiprocessing (``driver.Supervisor``; its stage runners: ``stage``)."""
