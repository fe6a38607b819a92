"""Load the index catalogue (service/indices/data/indices.json) into the database."""

from __future__ import annotations

from service.db import SessionScope
from service.indices.catalogue import IndexDefinition, load_catalogue
from service.indices.repository import upsert_index


async def seed_indices(
    sessions: SessionScope, catalogue: tuple[IndexDefinition, ...] | None = None
) -> int:
    definitions = catalogue if catalogue is not None else load_catalogue()
    async with sessions() as session:
        for definition in definitions:
            await upsert_index(session, definition)
    return len(definitions)
