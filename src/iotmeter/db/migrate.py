"""Schema migrations (Alembic), usable from a checkout and from an installed package."""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config

from iotmeter.config import normalize_database_url


def migrations_dir() -> Path:
    """The Alembic script folder: packaged in the wheel, or the checkout's `migrations/`."""
    packaged = Path(str(resources.files("iotmeter"))) / "_migrations"
    if (packaged / "env.py").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[3] / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    raise FileNotFoundError("iotmeter's migration scripts are missing from this installation")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    url = normalize_database_url(database_url)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the schema (blocking; runs its own event loop)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    """Upgrade from async code: Alembic's env runs its own loop, so it gets a thread."""
    await asyncio.to_thread(upgrade, database_url, revision)
