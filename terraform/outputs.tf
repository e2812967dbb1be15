output "public_url" {
  description = "URL users reach behalf at (BEHALF_PUBLIC_URL); register https://<domain>/oauth/callback as the redirect URI."
  value       = local.public_url
}

output "alb_dns_name" {
  description = "DNS name of the load balancer: point domain_name at it (alias A record) unless route53_zone_id did it."
  value       = aws_lb.api.dns_name
}

output "alb_zone_id" {
  description = "Route 53 hosted zone id of the load balancer, for an alias record."
  value       = aws_lb.api.zone_id
}

output "kms_key_arn" {
  description = "ARN of the KMS key that wraps the token data keys (BEHALF_KMS_KEY_ID)."
  value       = aws_kms_key.tokens.arn
}

output "kms_key_alias" {
  description = "Alias of the token KMS key."
  value       = aws_kms_alias.tokens.name
}

output "data_kms_key_arn" {
  description = "ARN of the KMS key that encrypts RDS, ElastiCache, Secrets Manager and CloudWatch Logs."
  value       = aws_kms_key.data.arn
}

output "ecs_cluster_name" {
  description = "Name of the ECS cluster running behalf."
  value       = aws_ecs_cluster.this.name
}

output "ecs_service_names" {
  description = "ECS service name of each long-running role (api, worker, scheduler)."
  value = {
    api       = aws_ecs_service.api.name
    worker    = aws_ecs_service.worker.name
    scheduler = aws_ecs_service.scheduler.name
  }
}

output "task_definition_families" {
  description = "Task definition family of each role, ops included (the one-off task for behalf CLI commands)."
  value       = { for role, definition in aws_ecs_task_definition.this : role => definition.family }
}

output "task_role_arns" {
  description = "Task IAM role ARN of each role (the principals named in the token key policy)."
  value       = { for role, iam_role in aws_iam_role.task : role => iam_role.arn }
}

output "migrate_command" {
  description = "AWS CLI command that runs `behalf migrate` as a one-off ops task; run it before rolling out a new image. Replace the command override to run another behalf command (e.g. keys rotate)."
  value = join(" ", [
    "aws ecs run-task",
    "--region ${var.region}",
    "--cluster ${aws_ecs_cluster.this.name}",
    "--launch-type FARGATE",
    "--task-definition ${aws_ecs_task_definition.this["ops"].family}",
    "--network-configuration 'awsvpcConfiguration={subnets=[${join(",", local.private_subnet_ids)}],securityGroups=[${aws_security_group.task["ops"].id}],assignPublicIp=DISABLED}'",
    "--overrides '{\"containerOverrides\":[{\"name\":\"behalf\",\"command\":[\"behalf\",\"migrate\"]}]}'",
  ])
}

output "database_endpoint" {
  description = "Address of the PostgreSQL instance (private; the full URL is in the BEHALF_DATABASE_URL secret)."
  value       = aws_db_instance.this.address
}

output "redis_primary_endpoint" {
  description = "Primary endpoint of the Redis replication group (private, TLS; the full URLs are in the secrets)."
  value       = aws_elasticache_replication_group.this.primary_endpoint_address
}

output "secret_arns" {
  description = "Secrets Manager ARN of each secret setting, keyed by variable name (BEHALF_DATABASE_URL, ...)."
  value       = { for name, secret in aws_secretsmanager_secret.this : "BEHALF_${name}" => secret.arn }
}

output "log_group_names" {
  description = "CloudWatch log group of each role."
  value       = { for role, group in aws_cloudwatch_log_group.service : role => group.name }
}

output "queue_depth_metric" {
  description = "The CloudWatch metric behalf must publish for worker autoscaling (namespace, name, dimensions)."
  value = {
    namespace  = var.queue_depth_metric_namespace
    name       = var.queue_depth_metric_name
    dimensions = var.queue_depth_metric_dimensions
  }
}

output "ses_dns_records" {
  description = "DNS records that verify the SES domain and enable DKIM; create them yourself when route53_zone_id is null."
  value = concat(
    [{ name = "_amazonses.${var.mail_domain}", type = "TXT", value = aws_ses_domain_identity.mail.verification_token }],
    [for token in aws_ses_domain_dkim.mail.dkim_tokens : {
      name  = "${token}._domainkey.${var.mail_domain}"
      type  = "CNAME"
      value = "${token}.dkim.amazonses.com"
    }],
  )
}

output "vpc_id" {
  description = "Id of the VPC behalf runs in (created or given)."
  value       = local.vpc_id
}
