"""A logger that imports `logging` when it is first used.

The modules a `mailtresor search` process imports (store, index, keys) log
only on paths the search does not take, and importing `logging` costs about
4 ms of a process that should start in a few dozen."""

from __future__ import annotations


class LazyLogger:
    """Stands for `logging.getLogger(name)`: any attribute (`warning`,
    `info`, `isEnabledFor`, ...) is the real logger's."""

    __slots__ = ("_name", "_logger")

    def __init__(self, name: str):
        self._name = name
        self._logger = None

    def __getattr__(self, attr: str):
        if self._logger is None:
            import logging
            self._logger = logging.getLogger(self._name)
        return getattr(self._logger, attr)

    def __repr__(self) -> str:
        return f"<LazyLogger {self._name}>"
