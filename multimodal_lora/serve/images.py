"""Images from requests: ``data:`` URLs decoded within limits, remote URLs only where allowed.

A ``data:image/...;base64,`` URL is decoded, its pixel count checked from the
header *before* the pixels are decoded (a few hundred bytes can claim
gigapixels), and read with :func:`~multimodal_lora.data.images.load_image`.

Remote ``http(s)://`` URLs are refused unless the server was started with
``--allow-remote-images`` and the host is on the allow-list; even then the
host's every address is resolved and checked, and a private, loopback,
link-local, multicast or reserved one is refused (a server must not be made to
reach into the network it sits in). The connection goes to the checked address
(no second DNS lookup to rebind), and each redirect is checked the same way.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import logging
import re
import socket
import ssl
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from PIL import Image

from multimodal_lora.core.errors import ImageError
from multimodal_lora.data.images import MAX_PIXELS, FormatRefused, TooManyPixels, load_image
from multimodal_lora.serve.protocol import APIError

logger = logging.getLogger(__name__)

FORMATS = {"PNG", "JPEG", "WEBP"}
_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.IGNORECASE
)
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ImageLimits:
    """What one request's image may be."""

    max_pixels: int = MAX_PIXELS
    """Width × height; more is refused before decoding (a decompression bomb costs nothing to send)."""
    max_bytes: int = 20 * 1024 * 1024
    """The encoded image (also bounds a remote download)."""


@dataclass(frozen=True)
class RemotePolicy:
    """Whether and where remote image URLs may be fetched."""

    allow: bool = False
    hosts: frozenset[str] = field(default_factory=frozenset)
    """Host names (lower case) that may be fetched from; ``*`` allows any public host."""
    timeout: float = 10.0


def read_image(url: str, limits: ImageLimits, remote: RemotePolicy) -> Image.Image:
    """The RGB image a request's ``image_url`` names.

    Raises:
        APIError: 400 for anything wrong with the image or its URL, 403 for a
            remote URL this server may not fetch.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, limits)
    elif scheme in ("http", "https"):
        data = fetch_remote(url, limits, remote)
    else:
        raise APIError(
            400,
            f"image_url: unsupported URL scheme {scheme or '(none)'!r}; send a data:image/png;base64,... URL",
            param="messages",
        )
    return decode_image(data, limits)


def decode_data_url(url: str, limits: ImageLimits) -> bytes:
    """The bytes of a base64 ``data:`` URL."""
    match = _DATA_URL.match(url[:256])
    if not match or not match.group("b64"):
        raise APIError(
            400,
            "image_url: a data URL must be base64, like data:image/png;base64,iVBOR...",
            param="messages",
            code="bad_image_url",
        )
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise APIError(
            400,
            f"image_url: the data URL says {mime!r}; send an image (PNG, JPEG or WebP)",
            param="messages",
            code="not_an_image",
        )
    payload = url[match.end() :]
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise APIError(
            413,
            f"image_url: the image is over {limits.max_bytes:,} bytes; send a smaller one",
            param="messages",
            code="image_too_large",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(
            400, f"image_url: the data URL's base64 does not decode ({exc})", param="messages", code="bad_base64"
        ) from None


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Check the format and pixel count from the header, then decode to RGB."""
    try:
        return load_image(data, name="image_url", max_pixels=limits.max_pixels, formats=FORMATS)
    except TooManyPixels as exc:
        if exc.size is None:
            message = f"image_url: too many pixels ({exc.detail}); this server takes at most {limits.max_pixels:,}; resize it"
        else:
            width, height = exc.size
            message = (
                f"image_url: too many pixels: {width}×{height} = {width * height:,} is more than this server takes "
                f"({limits.max_pixels:,}); resize it"
            )
        raise APIError(400, message, param="messages", code="too_many_pixels") from None
    except FormatRefused as exc:
        message = (
            "image_url: the data is not an image this server reads (PNG, JPEG or WebP)"
            if exc.format is None
            else f"image_url: {exc.format} images are not accepted; send PNG, JPEG or WebP"
        )
        raise APIError(400, message, param="messages", code="not_an_image") from None
    except ImageError as exc:
        raise APIError(400, str(exc), param="messages", code="not_an_image") from None


# --- remote images -----------------------------------------------------------------------------------


def check_address(address: str) -> None:
    """Refuse an address that is not on the public internet (IPv4-mapped IPv6 included)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if (
        not ip.is_global
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_unspecified
    ):
        raise APIError(
            403,
            f"image_url: {address} is a private, loopback, link-local or reserved address; this server fetches only public hosts",
            param="messages",
            code="remote_image_refused",
        )


def resolve_public(host: str, port: int) -> str:
    """Resolve ``host``; every address must be public. Returns the one to connect to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise APIError(
            400, f"image_url: cannot resolve {host!r} ({exc})", param="messages", code="remote_image_failed"
        ) from None
    addresses = sorted({info[4][0] for info in infos})
    for address in addresses:  # a name with one public and one private address is refused too
        check_address(address)
    return addresses[0]


def fetch_remote(url: str, limits: ImageLimits, remote: RemotePolicy) -> bytes:
    """Download an allowed remote image, checking the address of every hop."""
    if not remote.allow:
        raise APIError(
            403,
            "image_url: remote image URLs are not fetched by this server; send the image as a data: URL "
            "(or start the server with --allow-remote-images --allowed-hosts HOST)",
            param="messages",
            code="remote_image_refused",
        )
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise APIError(400, f"image_url: {url!r} is not an http(s) URL with a host", param="messages")
        if "*" not in remote.hosts and host not in remote.hosts:
            raise APIError(
                403,
                f"image_url: host {host!r} is not in this server's --allowed-hosts",
                param="messages",
                code="remote_image_refused",
            )
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = resolve_public(host, port)
        status, location, body = _get(
            parts.scheme, host, address, port, parts.path or "/", parts.query, limits, remote.timeout
        )
        if status in (301, 302, 303, 307, 308) and location:
            url = urljoin(url, location)
            continue
        if status != 200:
            raise APIError(
                400, f"image_url: {host} answered HTTP {status}", param="messages", code="remote_image_failed"
            )
        return body
    raise APIError(400, f"image_url: more than {MAX_REDIRECTS} redirects", param="messages", code="remote_image_failed")


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an already-checked address, with the certificate checked against the host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def _get(
    scheme, host, address, port, path, query, limits: ImageLimits, timeout: float
) -> tuple[int, str | None, bytes]:
    connection_class = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    connection = connection_class(host, address, port, timeout)
    try:
        connection.request("GET", path + (f"?{query}" if query else ""), headers={"Host": host, "Accept": "image/*"})
        response = connection.getresponse()
        body = response.read(limits.max_bytes + 1)
        if len(body) > limits.max_bytes:
            raise APIError(
                413,
                f"image_url: the image at {host} is over {limits.max_bytes:,} bytes",
                param="messages",
                code="image_too_large",
            )
        return response.status, response.getheader("Location"), body
    except (OSError, http.client.HTTPException) as exc:
        raise APIError(
            400, f"image_url: fetching from {host} failed ({exc})", param="messages", code="remote_image_failed"
        ) from None
    finally:
        connection.close()
