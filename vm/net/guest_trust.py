"""The guest's side of interception: it trusts the sandbox CA (its certificate only) and
its commands find the CA and the secrets' placeholders in their environment."""

from __future__ import annotations

from typing import Protocol

from .errors import NetworkSetupError

CA_DIR = "/etc/lanekit"
CA_FILE = f"{CA_DIR}/sandbox-ca.crt"
BUNDLE_FILE = f"{CA_DIR}/ca-bundle.crt"
DEBIAN_ANCHOR_DIR = "/usr/local/share/ca-certificates"
DEBIAN_ANCHOR = f"{DEBIAN_ANCHOR_DIR}/lanekit-sandbox.crt"
SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


def trust_env() -> dict[str, str]:
    """What makes OpenSSL, Python (ssl, requests), curl and node trust the sandbox CA."""
    return {
        "SSL_CERT_FILE": BUNDLE_FILE,
        "REQUESTS_CA_BUNDLE": BUNDLE_FILE,
        "CURL_CA_BUNDLE": BUNDLE_FILE,
        "NODE_EXTRA_CA_CERTS": CA_FILE,
    }


class GuestFiles(Protocol):
    async def read(self, path: str) -> bytes: ...
    async def write(self, path: str, data: bytes | str) -> int: ...
    async def exists(self, path: str) -> bool: ...
    async def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> None: ...


class GuestRunner(Protocol):
    async def __call__(self, argv: list[str]) -> int: ...


async def install_ca(fs: GuestFiles, run: GuestRunner, certificate_pem: bytes) -> None:
    """Put the CA certificate where the guest's tools look: ``/etc/lanekit`` (alone, and
    appended to the image's bundle, which the environment points at) and, in a Debian
    image with ``update-ca-certificates``, the system store. Raises NetworkSetupError if
    the guest's files cannot be written (intercepted flows would fail: the boot fails)."""
    try:
        await fs.mkdir(CA_DIR, parents=True)
        await fs.write(CA_FILE, certificate_pem)
        system = b""
        for bundle in SYSTEM_BUNDLES:
            if await fs.exists(bundle):
                system = await fs.read(bundle)
                break
        if system and not system.endswith(b"\n"):
            system += b"\n"
        await fs.write(BUNDLE_FILE, system + certificate_pem)
        if await fs.exists(DEBIAN_ANCHOR_DIR) and await fs.exists(
            "/usr/sbin/update-ca-certificates"
        ):
            await fs.write(DEBIAN_ANCHOR, certificate_pem)
            if await run(["update-ca-certificates"]) != 0:
                raise NetworkSetupError("update-ca-certificates failed in the guest")
    except OSError as exc:
        raise NetworkSetupError(f"cannot install the sandbox CA in the guest: {exc}") from None
