"""The errors the service answers with, as data: each carries its HTTP status, a code and, when waiting helps,
how long to wait.

The model's modules (batcher.py, service.py, image_embeddings.py) and the HTTP modules raise these; one
handler per API turns any of them into that API's error envelope (main.py, openai_api.py). No module
here knows Flask.
"""
from __future__ import annotations


class ApiError(Exception):
    """An error answered to the client with its HTTP status and a message a person can act on.

    `code` is a machine-readable reason and `param` the request field at fault; the OpenAI envelope shows
    both. `retry_after` (seconds) becomes a Retry-After header; `headers` are any others the answer needs.
    """

    # Set by errors whose message may hold a reason from this machine (a folder, a file): the answer
    # hides its paths, since anyone may read it.
    shows_local_reason = False

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self._headers = headers or {}

    @property
    def headers(self) -> dict[str, str]:
        retry = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return {**self._headers, **retry}


class ItemError(ApiError):
    """An error about one item of a request (a text or an image), known by its index among the items given.

    Each API names the item in its own words (texts[3], input[3]): `at(place)` is the error with that name
    in its message, which reads `<lead><place> <detail>`.
    """

    def __init__(self, status: int, detail: str, index: int | None = None, lead: str = "") -> None:
        super().__init__(status, detail)
        self.detail = detail
        self.index = index
        self.lead = lead

    def at(self, place: str) -> ApiError:
        return ApiError(self.status, f"{self.lead}{place} {self.detail}", code=self.code, param=self.param,
                        retry_after=self.retry_after)


# Seconds a client should wait before retrying while the model loads, or while another instance replaces
# one whose model thread has failed.
LOADING_RETRY_AFTER = 5
