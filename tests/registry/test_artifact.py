"""The artifact format and its signed spec, without NATS: build, sign, verify, tamper."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import cloudpickle
import pytest

from fnhost_sdk import artifact as art
from fnhost_sdk.artifact import DeployRefused, sign_spec, verify_artifact, verify_envelope

from .conftest import HELPERS, SigningKey, greeter
from .helpers import build_from_source

SETTINGS = {"trigger": {"request": "greet"}}


@pytest.fixture
def built(tmp_path: Path) -> art.Artifact:
    files = {"functions/greet.py": greeter("v1"), "functions/helpers.py": HELPERS}
    return build_from_source(tmp_path / "src", files)


def envelope_bytes(built: art.Artifact, key: SigningKey, **changes: object) -> bytes:
    envelope = sign_spec(
        name="greet", function=SETTINGS, artifact=built, object_name="greet/x", seed=key.seed
    )
    envelope.update(changes)
    return json.dumps(envelope).encode()


def test_the_module_and_its_local_helpers_travel_by_value(built: art.Artifact) -> None:
    assert "functions" not in sys.modules  # nothing on this side to import them from
    module = art.load_module(built.data)
    reply = asyncio.run(module.handle("ann"))
    assert reply["version"] == "v1"
    assert set(built.sources) == {"functions/greet.py", "functions/helpers.py"}
    with zipfile.ZipFile(BytesIO(built.data)) as archive:
        assert "source/functions/helpers.py" in archive.namelist()


def test_the_same_code_gives_the_same_bytes(tmp_path: Path) -> None:
    files = {"functions/greet.py": greeter("v1"), "functions/helpers.py": HELPERS}
    one = build_from_source(tmp_path / "a", files)
    two = build_from_source(tmp_path / "a", files)
    assert one.sha256 == two.sha256


def test_a_signed_spec_verifies(built: art.Artifact, signing_key: SigningKey) -> None:
    spec = verify_envelope(envelope_bytes(built, signing_key), "greet", [signing_key.public])
    assert spec.deployed_by == signing_key.public
    assert spec.sha256 == built.sha256
    assert spec.python == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert spec.cloudpickle == cloudpickle.__version__
    verify_artifact(spec, built.data, max_size=1 << 20)


def _code(call: object) -> str:
    with pytest.raises(DeployRefused) as caught:
        call()  # type: ignore[operator]
    return caught.value.code


def test_unsigned_untrusted_and_forged_specs_are_refused(
    built: art.Artifact, signing_key: SigningKey, other_key: SigningKey
) -> None:
    trusted = [signing_key.public]
    unsigned = envelope_bytes(built, signing_key, signature=None)
    assert _code(lambda: verify_envelope(unsigned, "greet", trusted)) == "unsigned"
    theirs = envelope_bytes(built, other_key)
    assert _code(lambda: verify_envelope(theirs, "greet", trusted)) == "untrusted"
    forged = json.loads(envelope_bytes(built, signing_key))
    forged["spec"]["function"] = {"trigger": {"request": "other"}}
    data = json.dumps(forged).encode()
    assert _code(lambda: verify_envelope(data, "greet", trusted)) == "bad-signature"
    # A key listed as trusted cannot vouch for a spec another key signed.
    forged = json.loads(theirs)
    forged["spec"]["deployed_by"] = signing_key.public
    data = json.dumps(forged).encode()
    assert _code(lambda: verify_envelope(data, "greet", trusted)) == "bad-signature"
    # A valid spec put under another key is not that function.
    good = envelope_bytes(built, signing_key)
    assert _code(lambda: verify_envelope(good, "other", trusted)) == "invalid-spec"


def test_rollback_of_is_outside_the_signature(built: art.Artifact, signing_key: SigningKey) -> None:
    data = envelope_bytes(built, signing_key, rollback_of=3)
    assert verify_envelope(data, "greet", [signing_key.public]).rollback_of == 3


def test_tampered_oversize_and_foreign_artifacts_are_refused(
    built: art.Artifact, signing_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = verify_envelope(envelope_bytes(built, signing_key), "greet", [signing_key.public])
    tampered = built.data.replace(b"v1", b"v9")
    assert _code(lambda: verify_artifact(spec, tampered, 1 << 20)) == "digest"
    assert _code(lambda: verify_artifact(spec, built.data, built.size - 1)) == "oversize"
    monkeypatch.setattr(art, "python_version", lambda: "3.99")
    assert _code(lambda: verify_artifact(spec, built.data, 1 << 20)) == "python"
    monkeypatch.undo()
    monkeypatch.setattr(cloudpickle, "__version__", "99.0.0")
    assert _code(lambda: verify_artifact(spec, built.data, 1 << 20)) == "cloudpickle"


def test_checks_never_unpickle(
    built: art.Artifact, signing_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickled")

    monkeypatch.setattr(cloudpickle, "loads", boom)
    spec = verify_envelope(envelope_bytes(built, signing_key), "greet", [signing_key.public])
    verify_artifact(spec, built.data, 1 << 20)
    with pytest.raises(DeployRefused):
        verify_artifact(spec, built.data + b"x", 1 << 20)


def test_a_missing_installed_package_is_named(tmp_path: Path) -> None:
    files = {
        "functions/greet.py": greeter("v1", extra="import fnhost_fake_pkg"),
        "functions/helpers.py": HELPERS,
        "fnhost_fake_pkg/__init__.py": "",
    }
    # fnhost_fake_pkg is imported from another sys.path root: it goes by reference.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "fnhost_fake_pkg.py").write_text("")
    sys.path.insert(0, str(tmp_path / "site"))
    try:
        files.pop("fnhost_fake_pkg/__init__.py")
        built = build_from_source(tmp_path / "src", files)
    finally:
        sys.path.remove(str(tmp_path / "site"))
        sys.modules.pop("fnhost_fake_pkg", None)
    with pytest.raises(DeployRefused) as caught:
        art.load_module(built.data)
    assert caught.value.code == "missing-package"
    assert "fnhost_fake_pkg" in str(caught.value)


def test_keys(tmp_path: Path) -> None:
    seed, public = art.keygen()
    assert seed.startswith(b"SU") and public.startswith("U") and len(public) == 56
    path = tmp_path / "k.nk"
    path.write_bytes(b"# comment\n" + seed + b"\n")
    assert art.read_seed(path) == seed
    path.write_text(public)
    with pytest.raises(DeployRefused):
        art.read_seed(path)
    assert base64.b32decode(public)[0] == 20 << 3  # nkeys' user prefix byte
