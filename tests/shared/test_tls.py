"""TLS and mutual TLS between Conveyor processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from conveyor.shared.channel import ClientTLS, create_channel
from conveyor.shared.server import ConveyorServer, create_server
from tests.support.certificates import CertificateAuthority
from tests.support.probe import Probe, ProbeClient
from tests.support.settings import TestServerSettings


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path)


@pytest.fixture
async def mtls_server(
    authority: CertificateAuthority, tmp_path: Path
) -> AsyncIterator[ConveyorServer]:
    issued = authority.issue("registry", server=True)
    settings = TestServerSettings(
        data_dir=tmp_path,
        tls_cert_file=issued.certificate,
        tls_key_file=issued.key,
        tls_client_ca_file=authority.certificate,
    )
    server = await create_server(settings, [Probe().registration()])
    yield server
    await server.server.stop(None)


async def test_mtls_admits_a_client_with_a_certificate_from_the_ca(
    mtls_server: ConveyorServer, authority: CertificateAuthority
) -> None:
    client = authority.issue("trainer", server=False)
    tls = ClientTLS(
        root_certificates=authority.certificate.read_bytes(),
        certificate_chain=client.certificate.read_bytes(),
        private_key=client.key.read_bytes(),
    )
    async with create_channel(f"127.0.0.1:{mtls_server.port}", tls=tls) as channel:
        reply = await ProbeClient(channel).whoami(empty_pb2.Empty(), timeout=5)
    assert reply.fields["trace_id"].string_value


@pytest.mark.parametrize("credentials", ["none", "ca-only", "other-ca"])
async def test_mtls_refuses_clients_without_a_trusted_certificate(
    mtls_server: ConveyorServer, authority: CertificateAuthority, tmp_path: Path, credentials: str
) -> None:
    target = f"127.0.0.1:{mtls_server.port}"
    if credentials == "none":
        channel = create_channel(target)
    elif credentials == "ca-only":
        channel = create_channel(
            target, tls=ClientTLS(root_certificates=authority.certificate.read_bytes())
        )
    else:
        stranger = CertificateAuthority(tmp_path, name="Other CA").issue("intruder", server=False)
        channel = create_channel(
            target,
            tls=ClientTLS(
                root_certificates=authority.certificate.read_bytes(),
                certificate_chain=stranger.certificate.read_bytes(),
                private_key=stranger.key.read_bytes(),
            ),
        )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ProbeClient(channel).whoami(empty_pb2.Empty(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
