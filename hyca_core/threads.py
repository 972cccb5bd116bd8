"""One inspection of the loaded thread pools (BLAS, OpenMP), reused for every limit we set.

threadpoolctl's ``threadpool_limits`` rescans every loaded library on each call (about 0.1 s);
a shared controller limits them in microseconds.
"""

from functools import cache

from threadpoolctl import ThreadpoolController  # a scikit-learn dependency


@cache
def _controller() -> ThreadpoolController:
    return ThreadpoolController()


def single_threaded(user_api: str):
    """Context manager holding the given library kind ("blas" or "openmp") to one thread."""
    return _controller().limit(limits=1, user_api=user_api)
