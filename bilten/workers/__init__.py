"""Background coroutines run by the supervisor (see :mod:`bilten.supervisor`)."""
