"""KMS for tests: moto's in-process KMS (it enforces the encryption context) and the local file."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from delegation.kms import AwsKms


@pytest.fixture
def kms_client() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client(
            "kms", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
        )


@pytest.fixture
def aws_kms(kms_client: Any) -> AwsKms:
    key_id = kms_client.create_key(Description="behalf test key")["KeyMetadata"]["Arn"]
    return AwsKms(kms_client, key_id)
