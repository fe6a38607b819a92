"""Credentials at rest (service/security.py): sealed for a public key, opened only with a
private key, picked by the key id the value carries; the legacy Fernet scheme still opens
(and, in the original set-up, still encrypts); bad keys are refused without being shown."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import pytest
from cryptography.fernet import Fernet
from structlog.testing import capture_logs

from service.config import Settings
from service.security import (
    CredentialDecryptionError,
    CredentialOpener,
    CredentialsKeyError,
    FernetSealer,
    PublicKeySealer,
    generate_key_pair,
    key_id,
    opener_from_settings,
    parse_private_keys,
    parse_public_key,
    public_key_of,
    sealer_from_settings,
)
from tests.support import ROOT, k8s_container_env

SEALED = re.compile(r"^nacl1:([0-9a-f]{8}):([A-Za-z0-9+/=]+)$")


def _settings(
    *, public: str | None = None, private: str | None = None, legacy: str | None = None
) -> Settings:
    # Explicit values win over the test run's environment (tests/conftest.py).
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        credentials_public_key=public,
        credentials_private_keys=private,
        credentials_keys=legacy,
    )


def test_a_sealed_value_names_its_key_and_opens_only_with_the_private_key() -> None:
    pair = generate_key_pair()
    sealer = PublicKeySealer(parse_public_key(pair.public_key))
    sealed = sealer.seal("my-bybit-secret")
    match = SEALED.match(sealed)
    assert match is not None
    assert match.group(1) == pair.key_id == key_id(parse_public_key(pair.public_key))
    assert "my-bybit-secret" not in sealed
    assert sealer.seal("my-bybit-secret") != sealed  # an ephemeral key per seal
    assert not hasattr(sealer, "open")  # the API's side has nothing that opens
    opener = CredentialOpener(parse_private_keys(pair.private_key))
    assert opener.open(sealed) == "my-bybit-secret"
    # Another private key cannot open it, and says which key is missing.
    other = CredentialOpener(parse_private_keys(generate_key_pair().private_key))
    with pytest.raises(CredentialDecryptionError, match=pair.key_id):
        other.open(sealed)


def test_an_opener_holds_several_keys_and_seals_for_the_first() -> None:
    new, old = generate_key_pair(), generate_key_pair()
    opener = CredentialOpener(parse_private_keys(f"{new.private_key}, {old.private_key}"))
    assert opener.key_ids == (new.key_id, old.key_id)
    from_old = PublicKeySealer(parse_public_key(old.public_key)).seal("secret-1")
    from_new = PublicKeySealer(parse_public_key(new.public_key)).seal("secret-2")
    assert opener.open(from_old) == "secret-1"
    assert opener.open(from_new) == "secret-2"
    resealed = opener.reseal(from_old)
    assert resealed.startswith(f"nacl1:{new.key_id}:")
    only_new = CredentialOpener(parse_private_keys(new.private_key))
    assert only_new.open(resealed) == "secret-1"
    assert opener.seal("x").startswith(f"nacl1:{new.key_id}:")


def test_a_damaged_sealed_value_is_a_clear_error() -> None:
    pair = generate_key_pair()
    opener = CredentialOpener(parse_private_keys(pair.private_key))
    sealed = PublicKeySealer(parse_public_key(pair.public_key)).seal("secret")
    raw = bytearray(base64.b64decode(sealed.split(":", 2)[2]))
    raw[-1] ^= 1
    tampered = f"nacl1:{pair.key_id}:{base64.b64encode(bytes(raw)).decode()}"
    for damaged in (tampered, f"nacl1:{pair.key_id}:not base64!", f"nacl1:{pair.key_id}", "nacl1:"):
        with pytest.raises(CredentialDecryptionError):
            opener.open(damaged)


@pytest.mark.parametrize(
    "value",
    [
        "not base64 at all!",
        base64.b64encode(b"short").decode(),
        base64.b64encode(b"x" * 33).decode(),
        Fernet.generate_key().decode().replace("=", ""),  # a Fernet key, unpadded
    ],
)
def test_bad_keys_are_refused_without_being_shown(value: str) -> None:
    for build in (
        lambda: parse_public_key(value),
        lambda: parse_private_keys(f"{generate_key_pair().private_key},{value}"),
        lambda: opener_from_settings(_settings(private=value)),
        lambda: sealer_from_settings(_settings(public=value)),
    ):
        with pytest.raises(CredentialsKeyError) as raised:
            build()
        assert value not in str(raised.value)
        assert raised.value.__cause__ is None  # nothing chained that could carry it
    with pytest.raises(CredentialsKeyError, match="entry 2") as raised:
        parse_private_keys(f"{generate_key_pair().private_key},{value}")
    with pytest.raises(CredentialsKeyError) as bad_fernet:
        opener_from_settings(_settings(legacy="not-a-fernet-key"))
    assert "not-a-fernet-key" not in str(bad_fernet.value)


def test_legacy_fernet_rows_open_with_credentials_keys_and_move_to_sealed_boxes() -> None:
    legacy_key = Fernet.generate_key().decode()
    token = Fernet(legacy_key.encode()).encrypt(b"legacy-secret").decode()
    pair = generate_key_pair()
    # A worker in the middle of the move: the private key and the legacy key.
    moving = opener_from_settings(_settings(private=pair.private_key, legacy=legacy_key))
    assert moving.open(token) == "legacy-secret"
    sealed = moving.reseal(token)
    assert sealed.startswith(f"nacl1:{pair.key_id}:")
    # After the move, a worker without CREDENTIALS_KEYS opens the row.
    assert opener_from_settings(_settings(private=pair.private_key)).open(sealed) == (
        "legacy-secret"
    )
    # A Fernet row where CREDENTIALS_KEYS is not set: a clear error saying what to do.
    with pytest.raises(CredentialDecryptionError, match="CREDENTIALS_KEYS is not set"):
        opener_from_settings(_settings(private=pair.private_key)).open(token)
    with pytest.raises(CredentialDecryptionError, match="any key in CREDENTIALS_KEYS"):
        opener_from_settings(_settings(legacy=Fernet.generate_key().decode())).open(token)


def test_the_original_symmetric_set_up_works_as_before() -> None:
    new_key, old_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with capture_logs() as logs:
        sealer = sealer_from_settings(_settings(legacy=old_key))
    assert isinstance(sealer, FernetSealer)
    # One warning: this API holds a key that decrypts.
    assert [e["event"] for e in logs] == ["credentials.api_holds_decryption_key"]
    assert old_key not in repr(logs)
    token = sealer.seal("secret")
    assert Fernet(old_key.encode()).decrypt(token.encode()) == b"secret"
    # Its rotation: new,old opens the old token and re-encrypts with the new key.
    rotating = opener_from_settings(_settings(legacy=f"{new_key},{old_key}"))
    assert rotating.key_ids == ()
    rotated = rotating.reseal(token)
    assert Fernet(new_key.encode()).decrypt(rotated.encode()) == b"secret"


def test_the_api_seals_with_the_public_key_whenever_it_is_set() -> None:
    pair = generate_key_pair()
    with capture_logs() as logs:
        sealer = sealer_from_settings(_settings(public=pair.public_key))
    assert logs == []  # nothing that opens: nothing to warn about
    assert SEALED.match(sealer.seal("secret"))


def test_the_api_refuses_to_start_holding_a_key_that_opens() -> None:
    """The legacy key beside the public key (a move half done), or any private key: the API
    refuses to start, naming the setting and never its value."""
    pair, legacy = generate_key_pair(), Fernet.generate_key().decode()
    for settings, named in (
        (_settings(public=pair.public_key, legacy=legacy), "CREDENTIALS_KEYS"),
        (_settings(public=pair.public_key, private=pair.private_key), "CREDENTIALS_PRIVATE_KEYS"),
        (_settings(private=pair.private_key), "CREDENTIALS_PRIVATE_KEYS"),
        (_settings(private=pair.private_key, legacy=legacy), "CREDENTIALS_PRIVATE_KEYS"),
    ):
        with pytest.raises(CredentialsKeyError, match="must not hold") as refused:
            sealer_from_settings(settings)
        assert named in str(refused.value)
        assert pair.private_key not in str(refused.value)
        assert legacy not in str(refused.value)


def test_each_role_refuses_to_start_without_what_it_needs() -> None:
    with pytest.raises(CredentialsKeyError, match="CREDENTIALS_PUBLIC_KEY"):
        sealer_from_settings(_settings())
    with pytest.raises(CredentialsKeyError, match="CREDENTIALS_PRIVATE_KEYS"):
        opener_from_settings(_settings())
    # A public key alone opens nothing.
    with pytest.raises(CredentialsKeyError):
        opener_from_settings(_settings(public=generate_key_pair().public_key))
    # Where both are given, the public key must be one the private keys open.
    mine, other = generate_key_pair(), generate_key_pair()
    with pytest.raises(CredentialsKeyError, match="matches no key"):
        opener_from_settings(_settings(public=other.public_key, private=mine.private_key))
    new = generate_key_pair()
    opener_from_settings(
        _settings(public=mine.public_key, private=f"{new.private_key},{mine.private_key}")
    )


def test_an_empty_setting_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CREDENTIALS_KEYS", "CREDENTIALS_PUBLIC_KEY", "CREDENTIALS_PRIVATE_KEYS"):
        monkeypatch.setenv(name, "")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.credentials_keys is None
    assert settings.credentials_public_key is None
    assert settings.credentials_private_keys is None
    monkeypatch.setenv("CREDENTIALS_PRIVATE_KEYS", " , ")
    assert Settings(_env_file=None).credentials_private_keys is None  # type: ignore[call-arg]


def test_keygen_prints_a_matching_pair_with_the_public_key_last() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "credentials", "keygen"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    values = dict(line.split("=", 1) for line in lines if not line.startswith("#"))
    assert set(values) == {"CREDENTIALS_PRIVATE_KEYS", "CREDENTIALS_PUBLIC_KEY"}
    assert lines[-1] == f"CREDENTIALS_PUBLIC_KEY={values['CREDENTIALS_PUBLIC_KEY']}"
    assert public_key_of(values["CREDENTIALS_PRIVATE_KEYS"]) == values["CREDENTIALS_PUBLIC_KEY"]
    comments = "\n".join(line for line in lines if line.startswith("#"))
    assert "PRIVATE" in comments
    assert "PUBLIC" in comments


def test_the_dev_stack_gives_each_process_only_the_keys_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.commands import _stack_env

    pair = generate_key_pair()
    monkeypatch.setenv("CREDENTIALS_PRIVATE_KEYS", pair.private_key)
    monkeypatch.setenv("CREDENTIALS_PUBLIC_KEY", pair.public_key)
    monkeypatch.setenv("CREDENTIALS_KEYS", Fernet.generate_key().decode())
    api = _stack_env("api")
    assert api["CREDENTIALS_PRIVATE_KEYS"] == api["CREDENTIALS_KEYS"] == ""
    assert api["CREDENTIALS_PUBLIC_KEY"] == pair.public_key
    for role in ("beat", "simulator"):
        env = _stack_env(role)
        assert not any(env[name] for name in ("CREDENTIALS_PRIVATE_KEYS", "CREDENTIALS_KEYS"))
        assert env["CREDENTIALS_PUBLIC_KEY"] == ""
    assert _stack_env("worker")["CREDENTIALS_PRIVATE_KEYS"] == pair.private_key


def test_the_deployment_gives_the_keys_to_their_roles_only() -> None:
    import yaml

    keys = {"CREDENTIALS_PUBLIC_KEY", "CREDENTIALS_PRIVATE_KEYS", "CREDENTIALS_KEYS"}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    held = {
        name: keys & set(service.get("environment", {}))
        for name, service in compose["services"].items()
    }
    assert held.pop("api") == {"CREDENTIALS_PUBLIC_KEY"}
    assert held.pop("worker") == {"CREDENTIALS_PRIVATE_KEYS", "CREDENTIALS_KEYS"}
    assert all(not names for names in held.values()), held  # beat, migrate, flower, ...

    given = {container: keys & names for container, names in k8s_container_env().items()}
    assert given.pop("trader-api/api") == {"CREDENTIALS_PUBLIC_KEY"}
    assert given.pop("trader-worker/worker") == {"CREDENTIALS_PRIVATE_KEYS"}
    assert {"trader-beat/beat", "trader-migrate/migrate"} <= set(given)
    assert all(not names for names in given.values()), given  # beat, migrate, seed
