# Shared values: account, network choice, the roles behalf runs as, and their settings.

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  create_vpc         = var.existing_network == null
  vpc_id             = local.create_vpc ? aws_vpc.this[0].id : var.existing_network.vpc_id
  public_subnet_ids  = local.create_vpc ? aws_subnet.public[*].id : var.existing_network.public_subnet_ids
  private_subnet_ids = local.create_vpc ? aws_subnet.private[*].id : var.existing_network.private_subnet_ids

  public_url = "https://${var.domain_name}"
  mail_from  = coalesce(var.mail_from, "behalf@${var.mail_domain}")

  # Non-secret settings, the same for every role. Secrets come from Secrets Manager (secrets.tf).
  # An empty value means "unset" to behalf's settings loader.
  environment = {
    BEHALF_ENV                  = "production"
    BEHALF_KMS_KEY_ID           = aws_kms_key.tokens.arn
    BEHALF_KMS_REGION           = var.region
    BEHALF_PUBLIC_URL           = local.public_url
    BEHALF_MAIL_FROM            = local.mail_from
    BEHALF_JOBS_MODULES         = join(",", var.jobs_modules)
    BEHALF_REFRESH_SKEW_SECONDS = var.refresh_skew_seconds == null ? "" : tostring(var.refresh_skew_seconds)
    BEHALF_LOG_LEVEL            = var.log_level
  }

  # The four roles: three long-running services and a one-off task for operators (migrations,
  # key rotation, re-queues). Each gets its own task role, execution role, log group, security
  # group and only the secrets it needs.
  roles = {
    api = {
      command      = tolist(["behalf", "api", "--host", "0.0.0.0", "--port", "8000"])
      cpu          = var.api_cpu
      memory       = var.api_memory
      port         = 8000
      stop_timeout = 30
      secrets      = tolist(["DATABASE_URL", "REDIS_URL", "BROKER_URL", "SECRET_KEY", "SMTP_URL", "OPS_TOKEN"])
    }
    worker = {
      command      = tolist(["behalf", "worker", "--concurrency", tostring(var.worker_concurrency)])
      cpu          = var.worker_cpu
      memory       = var.worker_memory
      port         = 0
      stop_timeout = 120
      secrets      = tolist(["DATABASE_URL", "REDIS_URL", "BROKER_URL", "SECRET_KEY", "SMTP_URL"])
    }
    scheduler = {
      command      = tolist(["behalf", "scheduler"])
      cpu          = var.scheduler_cpu
      memory       = var.scheduler_memory
      port         = 0
      stop_timeout = 30
      secrets      = tolist(["DATABASE_URL", "REDIS_URL", "BROKER_URL", "SECRET_KEY"])
    }
    ops = {
      command      = tolist(["behalf", "migrate"])
      cpu          = var.ops_cpu
      memory       = var.ops_memory
      port         = 0
      stop_timeout = 120
      secrets      = tolist(["DATABASE_URL", "REDIS_URL", "BROKER_URL", "SECRET_KEY", "SMTP_URL", "OPS_TOKEN"])
    }
  }

  # Roles whose task role may use the token key, and how (the key policy in kms.tf says so).
  token_key_users      = ["api", "worker"]
  token_key_rewrappers = ["ops"]
}
