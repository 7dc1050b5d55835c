"""TLS credentials, bearer tokens and caller identity, built in one place for both ends.

Both CLIs take the same flags (`--tls-cert`, `--tls-key`, `--tls-ca`, `--auth-token`), so
the errors raised here name those flags. PEM files are read when credentials are built,
so a missing or wrong file fails at start-up with a one-line message instead of a TLS
handshake error on the first call.

Tokens travel as `authorization: Bearer <token>` metadata, the header gRPC's own
access-token credentials use. gRPC refuses call credentials on plaintext channels, so
the edge adds the header with a channel interceptor instead: that works with and
without TLS (loopback tests and demos run without), and a warning is logged when a token
would cross a non-loopback network in clear text.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import grpc

from splitnet import wire

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"
AUTH_SCHEME = "Bearer "
AUTH_ENV = "SPLIT_AUTH_TOKEN"  # read by both CLIs when --auth-token is not given
MIN_TOKEN_LENGTH = 16


def read_pem(path: str, flag: str, kind: str = "CERTIFICATE") -> bytes:
    """The bytes of a PEM file holding `kind` ('CERTIFICATE' or 'PRIVATE KEY'), or a
    ValueError that names the flag and the path: gRPC itself would only fail at the
    first handshake, with an error that names neither."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    if not re.search(rb"-----BEGIN (?:[A-Z]+ )?" + kind.encode() + rb"-----", data):
        raise ValueError(f"{flag} {path}: not a PEM file holding a {kind.lower()}")
    return data


def server_credentials(cert: str, key: str, ca: str) -> grpc.ServerCredentials | None:
    """TLS with `cert` + `key`; with `ca` too, every client must present a certificate signed
    by it (mutual TLS). None when no TLS flag is set: the server speaks plaintext."""
    if not (cert or key or ca):
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together (the server's certificate chain and its private key)"
                         + ("; --tls-ca alone cannot serve TLS" if ca else ""))
    chain = read_pem(cert, "--tls-cert")
    return grpc.ssl_server_credentials([(read_pem(key, "--tls-key", "PRIVATE KEY"), chain)],
                                       root_certificates=read_pem(ca, "--tls-ca") if ca else None,
                                       require_client_auth=bool(ca))


def channel_credentials(ca: str, cert: str, key: str, server_name: str = "") -> grpc.ChannelCredentials | None:
    """TLS that verifies the server against `ca` (the system roots without it) and, with
    `cert` + `key`, presents a client certificate. None when no TLS flag is set."""
    if not (ca or cert or key):
        if server_name:
            raise ValueError("--tls-server-name needs TLS (give --tls-ca)")
        return None
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together (the client certificate for mutual TLS and its key)")
    return grpc.ssl_channel_credentials(root_certificates=read_pem(ca, "--tls-ca") if ca else None,
                                        certificate_chain=read_pem(cert, "--tls-cert") if cert else None,
                                        private_key=read_pem(key, "--tls-key", "PRIVATE KEY") if key else None)


def check_token(token: str, flag: str = "--auth-token") -> str:
    """A token must be a guess-resistant, header-safe string (printable ASCII, no spaces)."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{flag}: a token needs at least {MIN_TOKEN_LENGTH} characters "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"{flag}: a token may only hold printable ASCII without spaces")
    return token


def tokens_from(flag_values: Sequence[str]) -> tuple[str, ...]:
    """The tokens given with --auth-token, else the one in $SPLIT_AUTH_TOKEN (if set), each checked."""
    if flag_values:
        return tuple(check_token(t) for t in flag_values)
    env = os.environ.get(AUTH_ENV, "")
    return (check_token(env, f"${AUTH_ENV}"),) if env else ()


def token_fingerprint(token: str) -> str:
    """A short digest that names a token in logs and identities without revealing it."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def presented_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The bearer token in a call's metadata ('' if none)."""
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return text[len(AUTH_SCHEME):] if text.startswith(AUTH_SCHEME) else ""
    return ""


def token_matches(presented: str, tokens: Sequence[str]) -> bool:
    """Constant-time comparison against every accepted token (no early exit on a match)."""
    given = presented.encode()
    return bool(presented) and sum(hmac.compare_digest(given, t.encode()) for t in tokens) > 0


def principal(auth_context: Mapping[str, Sequence[bytes]], token: str) -> str:
    """Who is calling, as far as the transport proves it: the client certificate's common
    name under mutual TLS and the fingerprint of an accepted token. '' when neither is
    configured: every caller is then the same anonymous principal."""
    parts = [f"cert:{name.decode('utf-8', 'replace')}" for name in auth_context.get("x509_common_name", ())[:1]]
    if token:
        parts.append(f"token:{token_fingerprint(token)}")
    return ",".join(parts)


_CallDetails = collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                       "wait_for_ready", "compression"))


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    pass


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._metadata = ((AUTH_METADATA_KEY, AUTH_SCHEME + check_token(token)),)

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _ClientCallDetails(d.method, d.timeout, (*(d.metadata or ()), *self._metadata), d.credentials,
                                  d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(target: str, options: list[tuple[str, int | str]], *, tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", tls_server_name: str = "", auth_token: str = "") -> grpc.Channel:
    """A channel to `target`: TLS when any TLS file is given, the token on every call.

    `tls_server_name` checks the server's certificate against that name instead of the
    target's host, for connecting through a forwarder or by IP to a certificate that
    names a host.
    """
    credentials = channel_credentials(tls_ca, tls_cert, tls_key, tls_server_name)
    if credentials is None:
        if auth_token and not _is_loopback(target):
            log.warning("the auth token goes to %s in clear text: use TLS (--tls-ca) beyond loopback", target)
        channel = grpc.insecure_channel(target, options=options)
    else:
        if tls_server_name:
            options = [*options, ("grpc.ssl_target_name_override", tls_server_name)]
        channel = grpc.secure_channel(target, credentials, options=options)
    return grpc.intercept_channel(channel, _TokenInterceptor(auth_token)) if auth_token else channel


def _is_loopback(target: str) -> bool:
    try:
        host = wire.parse_address(target)[0]
    except ValueError:  # no port: the target is a host name alone
        host = target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
