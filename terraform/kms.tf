# Two customer-managed keys, both rotated yearly:
#
# - tokens: wraps the per-delegation data keys that encrypt OAuth tokens (BEHALF_KMS_KEY_ID).
#   Its policy names every principal itself; there is no "enable IAM policies" statement for the
#   account, so no IAM policy anywhere can widen it. The api and worker task roles may only
#   GenerateDataKey/Decrypt, and only with behalf's encryption context; the ops role may also
#   ReEncrypt (behalf keys rotate); every role may DescribeKey (start-up); administrators manage
#   the key but cannot use it.
# - data: encrypts the infrastructure at rest (RDS, Performance Insights, ElastiCache, Secrets
#   Manager, CloudWatch Logs). AWS services use it through grants, so it keeps the account
#   statement and IAM policies decide who may use it.

# --- tokens key ---------------------------------------------------------------------------------

locals {
  # behalf's encryption context is {purpose, user, delegation, agent} for delegation tokens and
  # {purpose, agent} for agent secrets: no other key may appear, purpose and agent always must.
  token_context_keys = ["purpose", "user", "delegation", "agent"]
}

data "aws_iam_policy_document" "tokens_key" {
  #checkov:skip=CKV_AWS_109:Key policy: the "*" resource is this key only, and only the named admin roles may manage it.
  #checkov:skip=CKV_AWS_111:Key policy: the "*" resource is this key only; write actions are limited to named roles and behalf's encryption context.
  #checkov:skip=CKV_AWS_356:Key policy: KMS key policies must use "*" as the resource (it means this key).
  statement {
    sid    = "KeyAdministrationWithoutUse"
    effect = "Allow"
    principals {
      type        = "AWS"
      identifiers = var.kms_admin_role_arns
    }
    # Deliberately no Encrypt/Decrypt/GenerateDataKey/ReEncrypt and no CreateGrant: an
    # administrator cannot read a token, nor hand themselves a grant to do so.
    actions = [
      "kms:CancelKeyDeletion",
      "kms:CreateAlias",
      "kms:DeleteAlias",
      "kms:DescribeKey",
      "kms:DisableKey",
      "kms:DisableKeyRotation",
      "kms:EnableKey",
      "kms:EnableKeyRotation",
      "kms:GetKeyPolicy",
      "kms:GetKeyRotationStatus",
      "kms:ListGrants",
      "kms:ListKeyPolicies",
      "kms:ListKeyRotations",
      "kms:ListResourceTags",
      "kms:PutKeyPolicy",
      "kms:RetireGrant",
      "kms:RevokeGrant",
      "kms:RotateKeyOnDemand",
      "kms:ScheduleKeyDeletion",
      "kms:TagResource",
      "kms:UntagResource",
      "kms:UpdateAlias",
      "kms:UpdateKeyDescription",
    ]
    resources = ["*"]
  }

  statement {
    sid    = "EnvelopeEncryptionWithBehalfContext"
    effect = "Allow"
    principals {
      type        = "AWS"
      identifiers = [for role in local.token_key_users : aws_iam_role.task[role].arn]
    }
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = ["*"]

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "kms:EncryptionContextKeys"
      values   = local.token_context_keys
    }
    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:purpose"
      values   = ["false"]
    }
    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:agent"
      values   = ["false"]
    }
    dynamic "condition" {
      for_each = length(var.kms_encryption_purposes) > 0 ? [var.kms_encryption_purposes] : []
      content {
        test     = "StringEquals"
        variable = "kms:EncryptionContext:purpose"
        values   = condition.value
      }
    }
  }

  statement {
    sid    = "RewrapDataKeysWithBehalfContext"
    effect = "Allow"
    principals {
      type        = "AWS"
      identifiers = [for role in local.token_key_rewrappers : aws_iam_role.task[role].arn]
    }
    actions   = ["kms:GenerateDataKey", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo"]
    resources = ["*"]

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "kms:EncryptionContextKeys"
      values   = local.token_context_keys
    }
    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:purpose"
      values   = ["false"]
    }
    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:agent"
      values   = ["false"]
    }
    dynamic "condition" {
      for_each = length(var.kms_encryption_purposes) > 0 ? [var.kms_encryption_purposes] : []
      content {
        test     = "StringEquals"
        variable = "kms:EncryptionContext:purpose"
        values   = condition.value
      }
    }
  }

  # Metadata only (no context exists for it): every behalf process resolves the key's ARN at
  # start-up (DescribeKey), the scheduler included, though it never uses the key.
  statement {
    sid    = "DescribeKeyForBehalfRoles"
    effect = "Allow"
    principals {
      type        = "AWS"
      identifiers = [for role in keys(local.roles) : aws_iam_role.task[role].arn]
    }
    actions   = ["kms:DescribeKey"]
    resources = ["*"]
  }
}

resource "aws_kms_key" "tokens" {
  description             = "${var.name}: wraps the data keys that encrypt delegated OAuth tokens"
  key_usage               = "ENCRYPT_DECRYPT"
  enable_key_rotation     = true
  rotation_period_in_days = 365
  deletion_window_in_days = var.kms_deletion_window_days
  policy                  = data.aws_iam_policy_document.tokens_key.json
}

resource "aws_kms_alias" "tokens" {
  name          = "alias/${var.name}-tokens"
  target_key_id = aws_kms_key.tokens.key_id
}

# --- data key -----------------------------------------------------------------------------------

data "aws_iam_policy_document" "data_key" {
  #checkov:skip=CKV_AWS_109:Key policy: the account statement is AWS's default and only delegates to IAM policies; "*" means this key.
  #checkov:skip=CKV_AWS_111:Key policy: the account statement is AWS's default and only delegates to IAM policies; "*" means this key.
  #checkov:skip=CKV_AWS_356:Key policy: KMS key policies must use "*" as the resource (it means this key).
  statement {
    sid    = "AccountDelegatesToIam"
    effect = "Allow"
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
    actions   = ["kms:*"]
    resources = ["*"]
  }

  statement {
    sid    = "CloudWatchLogsOfThisAccount"
    effect = "Allow"
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]

    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:*"]
    }
  }
}

resource "aws_kms_key" "data" {
  description             = "${var.name}: encrypts RDS, ElastiCache, Secrets Manager and CloudWatch Logs"
  key_usage               = "ENCRYPT_DECRYPT"
  enable_key_rotation     = true
  rotation_period_in_days = 365
  deletion_window_in_days = var.kms_deletion_window_days
  policy                  = data.aws_iam_policy_document.data_key.json
}

resource "aws_kms_alias" "data" {
  name          = "alias/${var.name}-data"
  target_key_id = aws_kms_key.data.key_id
}
