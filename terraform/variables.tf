# --- Deployment ---------------------------------------------------------------------------------

variable "region" {
  description = "AWS region to deploy into (also the region of the KMS key, SES identity and logs)."
  type        = string
}

variable "name" {
  description = "Name of this deployment; prefixes every resource name (e.g. behalf, behalf-staging)."
  type        = string
  default     = "behalf"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2-21 characters: lower-case letters, digits and hyphens, starting with a letter."
  }
}

variable "tags" {
  description = "Extra tags added to every resource (through the provider's default_tags)."
  type        = map(string)
  default     = {}
}

variable "container_image" {
  description = "The behalf image built from the repository's Dockerfile, by tag or (better) digest, e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/behalf@sha256:..."
  type        = string
}

variable "cpu_architecture" {
  description = "CPU architecture of the Fargate tasks: X86_64 or ARM64 (must match the image)."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.cpu_architecture)
    error_message = "cpu_architecture must be X86_64 or ARM64."
  }
}

# --- Public endpoint ----------------------------------------------------------------------------

variable "domain_name" {
  description = "Public host name users reach behalf at (e.g. behalf.example.com); BEHALF_PUBLIC_URL is https://<domain_name>."
  type        = string
}

variable "certificate_arn" {
  description = "ARN of an ACM certificate for domain_name, in the same region, used by the ALB's HTTPS listener."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:acm:", var.certificate_arn))
    error_message = "certificate_arn must be an ACM certificate ARN."
  }
}

variable "route53_zone_id" {
  description = "Optional Route 53 hosted zone id: when set, the ALB alias record for domain_name and the SES verification/DKIM records are created in it. When null, create them yourself from the outputs."
  type        = string
  default     = null
}

variable "allowed_ingress_cidrs" {
  description = "IPv4 CIDR blocks allowed to reach the HTTPS listener. Users' browsers must reach it (consent, callbacks, re-authorisation links), so the default is the whole internet."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "alb_deletion_protection" {
  description = "Protect the load balancer against deletion (set false only to tear the stack down)."
  type        = bool
  default     = true
}

variable "waf_rate_limit" {
  description = "Requests per 5 minutes that one client IP may send before the WAF blocks it."
  type        = number
  default     = 2000
}

variable "alb_log_retention_days" {
  description = "Days the ALB access logs are kept in their S3 bucket."
  type        = number
  default     = 365
}

# --- Network ------------------------------------------------------------------------------------

variable "existing_network" {
  description = "Use an existing VPC instead of creating one: its id, public subnet ids (for the ALB) and private subnet ids (for tasks, RDS, Redis; they need a NAT route to the internet). Null creates a new VPC."
  type = object({
    vpc_id             = string
    public_subnet_ids  = list(string)
    private_subnet_ids = list(string)
  })
  default = null
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC created when existing_network is null."
  type        = string
  default     = "10.40.0.0/16"
}

variable "availability_zone_count" {
  description = "Number of availability zones the created VPC spans (one public and one private subnet in each)."
  type        = number
  default     = 2

  validation {
    condition     = var.availability_zone_count >= 2 && var.availability_zone_count <= 4
    error_message = "availability_zone_count must be between 2 and 4 (RDS and the ALB need two zones)."
  }
}

variable "single_nat_gateway" {
  description = "Create one NAT gateway shared by all private subnets (cheaper) instead of one per zone (survives a zone outage)."
  type        = bool
  default     = false
}

# --- KMS ----------------------------------------------------------------------------------------

variable "kms_admin_role_arns" {
  description = "IAM role ARNs allowed to administer the KMS keys (not to use them). Include the role that runs Terraform, or AWS refuses the key policy."
  type        = list(string)

  validation {
    condition     = length(var.kms_admin_role_arns) > 0
    error_message = "kms_admin_role_arns needs at least one role, or nobody could manage the keys."
  }
}

variable "kms_encryption_purposes" {
  description = "Values allowed for kms:EncryptionContext:purpose on the token key: the purposes behalf's vault uses (delegation tokens, agent credentials). Empty allows any value, but a purpose must always be present."
  type        = list(string)
  default     = ["delegation-tokens", "agent-credential"]
}

variable "kms_deletion_window_days" {
  description = "Waiting period, in days, before a KMS key scheduled for deletion is destroyed."
  type        = number
  default     = 30
}

# --- Database -----------------------------------------------------------------------------------

variable "db_instance_class" {
  description = "RDS instance class of the PostgreSQL database."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_engine_version" {
  description = "PostgreSQL major version (RDS picks the latest minor and upgrades it automatically)."
  type        = string
  default     = "16"
}

variable "db_allocated_storage" {
  description = "Initial storage of the database, in GiB."
  type        = number
  default     = 50
}

variable "db_max_allocated_storage" {
  description = "Upper bound, in GiB, for RDS storage autoscaling."
  type        = number
  default     = 500
}

variable "db_multi_az" {
  description = "Run the database as a Multi-AZ deployment (a standby in another zone)."
  type        = bool
  default     = true
}

variable "db_backup_retention_days" {
  description = "Days automated database backups are retained (1-35)."
  type        = number
  default     = 14

  validation {
    condition     = var.db_backup_retention_days >= 1 && var.db_backup_retention_days <= 35
    error_message = "db_backup_retention_days must be between 1 and 35."
  }
}

variable "db_deletion_protection" {
  description = "Protect the database against deletion (set false only to tear the stack down)."
  type        = bool
  default     = true
}

# --- Redis --------------------------------------------------------------------------------------

variable "redis_node_type" {
  description = "ElastiCache node type of the Redis replication group."
  type        = string
  default     = "cache.t4g.small"
}

variable "redis_engine_version" {
  description = "Redis OSS engine version of the replication group (7.x, major.minor)."
  type        = string
  default     = "7.1"

  validation {
    condition     = can(regex("^7\\.[0-9]+$", var.redis_engine_version))
    error_message = "redis_engine_version must be a Redis 7 version such as 7.1 (the parameter group family is redis7)."
  }
}

variable "redis_num_cache_clusters" {
  description = "Nodes in the Redis replication group (primary + replicas, spread over zones); automatic failover and Multi-AZ are always on, so at least 2."
  type        = number
  default     = 2

  validation {
    condition     = var.redis_num_cache_clusters >= 2 && var.redis_num_cache_clusters <= 6
    error_message = "redis_num_cache_clusters must be between 2 and 6 (automatic failover needs a replica)."
  }
}

variable "redis_snapshot_retention_days" {
  description = "Days ElastiCache keeps automatic Redis snapshots (0 disables them)."
  type        = number
  default     = 7
}

# --- Application --------------------------------------------------------------------------------

variable "mail_domain" {
  description = "Domain verified in SES that notification mails are sent from (e.g. example.com)."
  type        = string
}

variable "mail_from" {
  description = "From: address of notification mails (BEHALF_MAIL_FROM); null means behalf@<mail_domain>."
  type        = string
  default     = null
}

variable "jobs_modules" {
  description = "Python modules in the image that define the @agent_job functions (BEHALF_JOBS_MODULES)."
  type        = list(string)
  default     = []
}

variable "refresh_skew_seconds" {
  description = "Minimum seconds before expiry at which access tokens are refreshed (BEHALF_REFRESH_SKEW_SECONDS); null keeps the built-in default."
  type        = number
  default     = null
}

variable "log_level" {
  description = "Log level of every behalf process (BEHALF_LOG_LEVEL): DEBUG, INFO, WARNING or ERROR."
  type        = string
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING or ERROR."
  }
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the application, VPC, database, Redis and WAF logs."
  type        = number
  default     = 365
}

# --- Services -----------------------------------------------------------------------------------

variable "api_cpu" {
  description = "Fargate CPU units of one api task (1024 = 1 vCPU)."
  type        = number
  default     = 512
}

variable "api_memory" {
  description = "Memory (MiB) of one api task."
  type        = number
  default     = 1024
}

variable "api_desired_count" {
  description = "Number of api tasks behind the load balancer."
  type        = number
  default     = 2
}

variable "worker_cpu" {
  description = "Fargate CPU units of one worker task."
  type        = number
  default     = 1024
}

variable "worker_memory" {
  description = "Memory (MiB) of one worker task."
  type        = number
  default     = 2048
}

variable "worker_concurrency" {
  description = "Celery processes per worker task (behalf worker --concurrency)."
  type        = number
  default     = 4
}

variable "worker_min_count" {
  description = "Fewest worker tasks the autoscaler keeps running."
  type        = number
  default     = 1

  validation {
    condition     = var.worker_min_count >= 1
    error_message = "worker_min_count must be at least 1: the backlog-per-task metric divides by the running task count."
  }
}

variable "worker_max_count" {
  description = "Most worker tasks the autoscaler may run."
  type        = number
  default     = 10
}

variable "worker_target_backlog_per_task" {
  description = "Target of the worker autoscaling policy: queued jobs per running worker task (QueueDepth / RunningTaskCount)."
  type        = number
  default     = 20
}

variable "scheduler_cpu" {
  description = "Fargate CPU units of one scheduler task."
  type        = number
  default     = 256
}

variable "scheduler_memory" {
  description = "Memory (MiB) of one scheduler task."
  type        = number
  default     = 512
}

variable "scheduler_desired_count" {
  description = "Number of scheduler tasks; more than one is safe (slots are claimed in the database) and gives a hot standby."
  type        = number
  default     = 2
}

variable "ops_cpu" {
  description = "Fargate CPU units of the one-off ops task (behalf migrate, behalf keys rotate, ...)."
  type        = number
  default     = 512
}

variable "ops_memory" {
  description = "Memory (MiB) of the one-off ops task."
  type        = number
  default     = 1024
}

# --- Queue depth metric (published by behalf, read by the worker autoscaling policy) -------------

variable "queue_depth_metric_namespace" {
  description = "CloudWatch namespace of the queue depth metric behalf publishes; the scheduler's task role may publish only to it."
  type        = string
  default     = "behalf"
}

variable "queue_depth_metric_name" {
  description = "CloudWatch metric name of the number of jobs waiting in the Celery queue."
  type        = string
  default     = "QueueDepth"
}

variable "queue_depth_metric_dimensions" {
  description = "Dimensions the queue depth metric is published with (empty: none); must match what the app publishes exactly."
  type        = map(string)
  default     = {}
}
