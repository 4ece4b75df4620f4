"""A schemathesis check for a run with a ``read`` token (``SCHEMATHESIS_HOOKS`` names this file): an
operation whose OpenAPI security asks for any scope but ``read`` must never succeed."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.check
def no_write_succeeds_with_a_read_token(ctx: Any, response: Any, case: Any) -> None:
    security = case.operation.definition.raw.get("security") or []
    needs = {scope for requirement in security for scopes in requirement.values() for scope in scopes}
    if needs - {"read"} and 200 <= response.status_code < 300:
        raise AssertionError(
            f"{case.method} {case.path} needs {sorted(needs)}, yet a read token got {response.status_code}"
        )
