"""One inspection of the loaded thread pools (BLAS, OpenMP), reused for every limit we set.

threadpoolctl's ``threadpool_limits`` rescans every loaded library on each call; a shared
controller inspects them once and then only sets the limits, at a small fraction of that cost
(both timed in the README, "The algorithm's own costs").
"""

from functools import cache

from threadpoolctl import ThreadpoolController  # a scikit-learn dependency


@cache
def _controller() -> ThreadpoolController:
    return ThreadpoolController()


def single_threaded(user_api: str):
    """Context manager holding the given library kind ("blas" or "openmp") to one thread."""
    return _controller().limit(limits=1, user_api=user_api)
