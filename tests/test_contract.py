"""The gRPC contract and the Python value types must not drift apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twinroute.scheduler.types import Role
from twinroute.v1 import scheduler_pb2

from twinroute.vocabulary import DecisionReason

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_decision_reasons_mirror_the_proto_enum() -> None:
    proto_names = {
        name.removeprefix("DECISION_REASON_").lower()
        for name, _number in scheduler_pb2.DecisionReason.items()
    }
    # UNSPECIFIED stands for a reason this side does not know (a newer peer's).
    assert proto_names == {reason.value for reason in DecisionReason}


def test_roles_mirror_the_proto_enum() -> None:
    proto_names = {
        name.removeprefix("ROLE_").lower()
        for name, _number in scheduler_pb2.Role.items()
        if name != "ROLE_UNSPECIFIED"
    }
    assert proto_names == {role.value for role in Role}


def test_contract_is_versioned() -> None:
    assert scheduler_pb2.DESCRIPTOR.package == "twinroute.v1"
