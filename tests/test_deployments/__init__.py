import time
from typing import Any

import httpx

#: Idle connections expire before the servers' (uvicorn's 5 s), so a request never meets a connection
#: the server is closing at that moment (a reset).
KEEP_ALIVE = httpx.Limits(keepalive_expiry=2.0)


class PrefectRest(httpx.Client):
    """A client of Prefect's REST API that retries what Prefect's own client retries
    (`prefect.client.base.PrefectHttpxSyncClient`): a 503, which SQLite answers when two writes meet
    (the server's Retry-After says when to try again), and a connection the server closed before
    answering (a uvicorn bug, PrefectHQ/prefect#7512; the request was never read, so sending it again
    does it once)."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url=base_url, timeout=30, limits=KEEP_ALIVE)

    def request(self, method: str, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        dropped = 0
        for _ in range(50):
            try:
                answer = super().request(method, url, **kwargs)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                dropped += 1
                if dropped > 3:
                    raise
                time.sleep(0.2)
                continue
            if answer.status_code != 503:
                return answer
            time.sleep(float(answer.headers.get("Retry-After", "0.2")))
        return answer
