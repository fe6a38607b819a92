# The fuzz run reuses the integration fixtures (database, simulator, API process).
from tests.integration.conftest import (  # noqa: F401
    api_url,
    service_env,
    sim,
    simulator_url,
    warm_market,
)
