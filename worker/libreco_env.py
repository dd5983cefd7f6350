"""TensorFlow and libreco, imported the one way that keeps them quiet, and their settings.

TensorFlow reads TF_CPP_MIN_LOG_LEVEL only when first imported, and libreco logs deprecation
warnings when imported: import `tf` (and libreco after it) from here, before anything else
imports them. Used by the serving engine and by training.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # reads TF_CPP_MIN_LOG_LEVEL when first imported

# libreco calls tf.disable_v2_behavior() on import, which logs deprecation warnings.
tf.get_logger().setLevel("ERROR")

__all__ = [
    "in_graph",
    "limit_threads",
    "native_output_discarded",
    "quiet",
    "tf",
    "tf_session_config",
]


def tf_session_config(threads: int) -> dict[str, object]:
    """The ConfigProto fields libreco's `tf_sess_config` takes, for `threads` CPU threads."""
    return {
        "intra_op_parallelism_threads": threads,
        "inter_op_parallelism_threads": threads,
        "allow_soft_placement": True,
    }


def in_graph(graph: Any) -> contextlib.AbstractContextManager[Any]:
    """`graph` as TensorFlow's default graph; nothing for a model that has none."""
    return graph.as_default() if graph is not None else contextlib.nullcontext()


def limit_threads(threads: int) -> None:
    """Cap the process's BLAS/OpenMP pools and torch's intra-op pool at `threads`."""
    threadpool_limits(limits=threads)
    torch.set_num_threads(threads)


class _Discard(io.StringIO):
    def write(self, text: str) -> int:
        return len(text)


@contextlib.contextmanager
def quiet(stderr: bool = False) -> Iterator[None]:
    """Swallow what libreco prints to stdout (and, with stderr, tqdm bars and warnings).

    This swaps sys.stdout and the warning filters for the whole process: use it from one
    thread only, and log nothing inside it.
    """
    sink = _Discard()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sink))
        if stderr:
            stack.enter_context(contextlib.redirect_stderr(sink))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def native_output_discarded() -> Iterator[None]:
    """Native code (libreco's Rust neighbourhood models) prints progress straight to file
    descriptor 1, where `uro-recs train` writes its JSON answer and workers their logs: point
    it at /dev/null meanwhile. Process-wide, like `quiet`."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
