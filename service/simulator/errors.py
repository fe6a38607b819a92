from __future__ import annotations


class BybitReply(Exception):
    """A business answer: HTTP 200 with a non-zero retCode."""

    def __init__(self, code: int, msg: str) -> None:
        self.code = code
        self.msg = msg
        super().__init__(msg)
