"""Keys, the internal token and TLS, against real services: a draft and a target that answer only callers with the
internal token, and a router that wants an API key on both public APIs and serves them over TLS."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specfleet.client import channel, make_request, stream
from specfleet.launcher import Deployment, free_port, wait_redis, wait_serving
from specfleet.protos import (
    draft_pb2,
    draft_pb2_grpc,
    generate_pb2,
    generate_pb2_grpc,
    session_pb2,
    target_pb2,
    target_pb2_grpc,
)

pytestmark = pytest.mark.real_model

TOKEN = "internal-token-for-the-test"
OTHER_TOKEN = "internal-token-of-another-router"  # draft and target answer both; each is a caller of its own
KEYS = ("key-one", "key-two")  # one in the key file, one in the environment
ADMIN_KEY = "key-of-the-admin"


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Sealed:
    deployment: Deployment
    addresses: dict[str, str]  # target, draft, router (gRPC, TLS) by role
    https: str  # the router's OpenAI API
    ca: str  # the certificate to trust


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Sealed]:
    folder = tmp_path_factory.mktemp("sealed")
    token_file, tokens_file, key_file = folder / "token", folder / "tokens", folder / "keys"
    token_file.write_text(TOKEN + "\n")
    tokens_file.write_text(f"{TOKEN}\n{OTHER_TOKEN}\n")
    key_file.write_text(f"# the router's API keys\n{KEYS[0]}\n")
    cert, key = _self_signed(folder)
    with Deployment(folder / "logs") as deployment:
        redis_port = free_port()
        wait_redis(deployment.start_redis(redis_port), redis_port)
        addresses = {}
        common = ["--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
        for name, args in (("target", ["--model", str(smollm2_dir), "--num-slots", "4", "--max-seq-len", "512"]),
                           ("draft", ["--drafter", "ngram"])):
            port = free_port()
            process = deployment.start_service(name, [*args, *common, "--internal-token-file", str(tokens_file),
                                                      "--port", str(port)], name=f"sealed-{name}")
            addresses[name] = f"127.0.0.1:{port}"
            wait_serving(process, addresses[name])
        router_port, http_port = free_port(), free_port()
        process = deployment.start(
            "sealed-router", [sys.executable, "-m", "specfleet.cli", "router", "--port", str(router_port),
                              "--http-port", str(http_port), "--targets", addresses["target"], "--drafts",
                              addresses["draft"], "--depth", "3", "--api-key-file", str(key_file),
                              "--tls-cert", str(cert), "--tls-key", str(key), "--internal-token-file",
                              str(token_file), *common],
            env={"SPECFLEET_API_KEYS": KEYS[1], "SPECFLEET_ADMIN_KEYS": ADMIN_KEY})
        addresses["router"] = f"127.0.0.1:{router_port}"
        wait_serving(process, addresses["router"], tls_ca=str(cert))
        yield Sealed(deployment, addresses, f"https://127.0.0.1:{http_port}/v1", str(cert))


def _calls(address: str, service: str, metadata) -> dict[str, object]:
    """The status each call of ``service`` (draft or target) gets from ``address`` with ``metadata``: OK when it got
    through; and the health check's."""
    delta = session_pb2.SequenceDelta(seq_id="intruder", new_tokens=[1, 2, 3])
    outcomes: dict[str, object] = {}
    with grpc.insecure_channel(address) as channel:
        stub = (target_pb2_grpc.TargetServiceStub if service == "target" else draft_pb2_grpc.DraftServiceStub)(channel)
        calls = {"GetInfo": (stub.GetInfo, session_pb2.GetServiceInfoRequest()),
                 "Release": (stub.Release, session_pb2.ReleaseSequencesRequest(seq_ids=["x"]))}
        if service == "target":
            calls["Verify"] = (stub.Verify, target_pb2.VerifyRequest(entries=[target_pb2.VerifyEntry(sequence=delta)]))
        else:
            calls["Propose"] = (stub.Propose, draft_pb2.ProposeRequest(entries=[draft_pb2.ProposeEntry(
                sequence=delta, depth=2)]))
        for name, (method, request) in calls.items():
            try:
                method(request, timeout=30, metadata=metadata)
                outcomes[name] = grpc.StatusCode.OK
            except grpc.RpcError as err:
                outcomes[name] = err.code()
        outcomes["Health"] = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                       timeout=30).status
    return outcomes


def test_draft_and_target_answer_only_callers_with_the_internal_token(sealed: Sealed) -> None:
    for service in ("target", "draft"):
        for metadata in (None, (("x-specfleet-token", "a guess"),)):
            outcomes = _calls(sealed.addresses[service], service, metadata)
            assert outcomes.pop("Health") == health_pb2.HealthCheckResponse.SERVING  # probes need no token
            assert set(outcomes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, (service, outcomes)
        for token in (TOKEN, OTHER_TOKEN):
            with_token = _calls(sealed.addresses[service], service, (("x-specfleet-token", token),))
            assert with_token["GetInfo"] == with_token["Release"] == grpc.StatusCode.OK


def test_two_routers_with_their_own_tokens_share_draft_and_target(sealed: Sealed) -> None:
    port = free_port()
    process = sealed.deployment.start("other-router", [
        sys.executable, "-m", "specfleet.cli", "router", "--port", str(port), "--targets", sealed.addresses["target"],
        "--drafts", sealed.addresses["draft"], "--depth", "3"], env={"SPECFLEET_INTERNAL_TOKEN": OTHER_TOKEN})
    other = f"127.0.0.1:{port}"
    wait_serving(process, other, timeout_s=120)
    prompts = ["def fib(n):", "The capital of France is"]

    def generate(address: str, prompt: str, **tls) -> list[int]:
        request = make_request(prompt, max_new_tokens=24, ignore_eos=True)
        return [t for r in stream(address, request, timeout_s=300, **tls) for t in r.token_ids]

    alone = [generate(other, p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:  # both routers at once, over the same sequences' services
        mine = [pool.submit(generate, sealed.addresses["router"], p, api_key=KEYS[0], tls_ca=sealed.ca)
                for p in prompts]
        theirs = [pool.submit(generate, other, p) for p in prompts]
        assert [f.result() for f in mine] == [f.result() for f in theirs] == alone


def test_a_router_without_the_token_cannot_use_them(sealed: Sealed) -> None:
    port = free_port()
    process = sealed.deployment.start("tokenless-router", [
        sys.executable, "-m", "specfleet.cli", "router", "--port", str(port), "--targets", sealed.addresses["target"],
        "--drafts", "", "--depth", "0"])
    with pytest.raises(RuntimeError, match="internal token is missing"):
        wait_serving(process, f"127.0.0.1:{port}", timeout_s=120)


def test_the_public_grpc_api_wants_a_key_over_tls(sealed: Sealed) -> None:
    router, ca = sealed.addresses["router"], sealed.ca
    request = make_request("def fib(n):", max_new_tokens=8)
    for key, code in (("", grpc.StatusCode.UNAUTHENTICATED), ("not-a-key", grpc.StatusCode.UNAUTHENTICATED)):
        with pytest.raises(grpc.RpcError) as refused:
            list(stream(router, request, timeout_s=60, api_key=key, tls_ca=ca))
        assert refused.value.code() == code
    answers = [[t for m in stream(router, request, timeout_s=300, api_key=key, tls_ca=ca) for t in m.token_ids]
               for key in KEYS]  # the file's key and the environment's
    assert len(answers[0]) == 8 and answers[0] == answers[1]
    with pytest.raises(grpc.RpcError) as plain:  # no TLS: the handshake fails
        list(stream(router, request, timeout_s=10, api_key=KEYS[0]))
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_http_api_wants_a_key_over_tls(sealed: Sealed) -> None:
    base, ca = sealed.https, ssl.create_default_context(cafile=sealed.ca)

    def client(key: str, verify: ssl.SSLContext | bool = ca) -> openai.OpenAI:
        return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300,
                             http_client=httpx.Client(verify=verify))

    with pytest.raises(openai.AuthenticationError, match="API key is wrong"):
        client("not-a-key").models.list()
    model = client(KEYS[0]).models.list().data[0].id
    answer = client(KEYS[1]).completions.create(model=model, prompt="def fib(n):", max_tokens=8, temperature=0)
    assert answer.usage.completion_tokens == 8
    assert httpx.get(base.removesuffix("/v1") + "/health", verify=ca).status_code == 200  # probes need no key
    missing = httpx.get(base + "/models", verify=ca)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.APIConnectionError):  # a client that does not trust the certificate
        client(KEYS[0], verify=True).models.list()


def test_only_the_caller_or_an_admin_aborts_a_request_or_sees_the_internal_addresses(sealed: Sealed) -> None:
    router, ca = sealed.addresses["router"], sealed.ca

    def as_caller(key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key}"),)

    with channel(router, ca) as open_channel:
        stub = generate_pb2_grpc.GenerationServiceStub(open_channel)
        for owner, other in ((KEYS[0], KEYS[1]), (KEYS[1], ADMIN_KEY)):
            request = make_request("def fib(n):", request_id=f"owned-by-{owner}", max_new_tokens=400, ignore_eos=True)
            call = stub.GenerateStream(request, timeout=300, metadata=as_caller(owner))
            next(call)
            aborted = stub.Abort(generate_pb2.AbortRequest(request_id=request.request_id), timeout=30,
                                 metadata=as_caller(other)).aborted
            if other == ADMIN_KEY:
                assert aborted  # an admin may end anyone's request
            else:
                assert not aborted  # another caller may not, and learns nothing: as for an unknown id
                next(call)  # still streaming
                assert stub.Abort(generate_pb2.AbortRequest(request_id=request.request_id), timeout=30,
                                  metadata=as_caller(owner)).aborted
            assert list(call)[-1].finish_reason == generate_pb2.FINISH_REASON_ABORTED

        def info(key: str) -> generate_pb2.GetServerInfoResponse:
            return stub.GetServerInfo(generate_pb2.GetServerInfoRequest(), timeout=30, metadata=as_caller(key))

        assert not info(KEYS[0]).target_addresses and not info(KEYS[0]).draft_addresses
        assert list(info(ADMIN_KEY).target_addresses) == [sealed.addresses["target"]]
        assert list(info(ADMIN_KEY).draft_addresses) == [sealed.addresses["draft"]]
        assert info(KEYS[0]).model == info(ADMIN_KEY).model
