# The long scenarios reuse the integration fixtures (database, simulator, API, workers).
from tests.integration.conftest import (  # noqa: F401
    api,
    funded_user,
    service_env,
    sim,
    simulator_url,
    warm_market,
)
