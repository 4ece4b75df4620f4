import httpx

#: Idle connections expire before the servers' (uvicorn's 5 s), so a request never meets a connection
#: the server is closing at that moment (a reset).
KEEP_ALIVE = httpx.Limits(keepalive_expiry=2.0)
