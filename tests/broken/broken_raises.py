"""A tasks module that fails while it is imported."""

msg = "this module cannot be imported"
raise RuntimeError(msg)
