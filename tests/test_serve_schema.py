"""Generated requests (schemathesis, from the server's own OpenAPI schema): no input makes a server error.

Driven through hypothesis directly: schemathesis' pytest plugin does not run on pytest 9.
"""

from __future__ import annotations

from collections import Counter

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

EXAMPLES_PER_OPERATION = 40
# schemathesis waits 10 s for a response by default. A valid request may ask for 10 images of 20 steps (three
# compiled calls of the tiny model): seconds alone, but more than 10 while the other test worker compiles on the
# same two cores (a CI run failed so, and hypothesis called it flaky when the retry was quicker). The bound here
# is for a hung server, not for speed.
RESPONSE_TIMEOUT_S = 300


def test_generated_requests_get_no_server_error(sd_batch4):
    from aotdiffusion.serve import create_app

    # max_steps (the model's default, 20) keeps each generated valid request to seconds on the tiny model.
    app = create_app([f"sd={sd_batch4}"], max_wait_ms=0, max_steps=20, max_upload_bytes=2**20)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: Counter[str] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def check(case) -> None:
            response = case.call(timeout=RESPONSE_TIMEOUT_S)
            statuses[f"{case.method} {case.path} {response.status_code}"] += 1
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"
            # Every other check runs; a schema-valid request may still break a rule the schema cannot state
            # (a size this model was compiled for, guidance its UNet was compiled for, --max-steps): a 400.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        check()
    operations = {key.rsplit(" ", 1)[0] for key in statuses}
    assert {"POST /v1/images/generations", "POST /v1/images/edits", "GET /v1/models"} <= operations
    print(f"\nschemathesis: {sum(statuses.values())} generated requests, 0 server errors: {dict(statuses)}")
