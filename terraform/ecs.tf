# ECS on Fargate: one cluster, a task definition per role and a service for api, worker and
# scheduler. The ops task definition has no service: run it as a one-off task
# (`terraform output -raw migrate_command`).

resource "aws_ecs_cluster" "this" {
  name = var.name

  setting {
    name  = "containerInsights"
    value = "enabled" # also publishes RunningTaskCount, used by the worker autoscaling policy
  }

  configuration {
    execute_command_configuration {
      kms_key_id = aws_kms_key.data.arn
      logging    = "OVERRIDE"

      log_configuration {
        cloud_watch_encryption_enabled = true
        cloud_watch_log_group_name     = aws_cloudwatch_log_group.ecs_exec.name
      }
    }
  }
}

resource "aws_ecs_task_definition" "this" {
  for_each = local.roles

  family                   = "${var.name}-${each.key}"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = each.value.cpu
  memory                   = each.value.memory
  execution_role_arn       = aws_iam_role.execution[each.key].arn
  task_role_arn            = aws_iam_role.task[each.key].arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  # The root filesystem is read-only; /tmp is a scratch volume on the task's ephemeral storage.
  volume {
    name = "tmp"
  }

  container_definitions = jsonencode([
    {
      name                   = "behalf"
      image                  = var.container_image
      command                = each.value.command
      essential              = true
      user                   = "10001:10001"
      readonlyRootFilesystem = true
      privileged             = false
      stopTimeout            = each.value.stop_timeout
      linuxParameters        = { initProcessEnabled = true }
      mountPoints            = [{ sourceVolume = "tmp", containerPath = "/tmp", readOnly = false }]
      portMappings = [
        for port in(each.value.port > 0 ? [each.value.port] : []) : { containerPort = port, protocol = "tcp" }
      ]
      environment = [for name, value in local.environment : { name = name, value = value }]
      secrets = [
        for name in each.value.secrets : {
          name      = "BEHALF_${name}"
          valueFrom = aws_secretsmanager_secret.this[name].arn
        }
      ]
      healthCheck = each.value.port > 0 ? {
        command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${each.value.port}/healthz', timeout=3)"]
        interval    = 15
        timeout     = 5
        retries     = 3
        startPeriod = 30
      } : null
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.service[each.key].name
          awslogs-region        = var.region
          awslogs-stream-prefix = each.key
        }
      }
    }
  ])

  # Each service's secrets must exist (with a value) before a task can start.
  depends_on = [aws_secretsmanager_secret_version.this]
}

locals {
  service_network = {
    subnets          = local.private_subnet_ids
    assign_public_ip = false
  }
}

resource "aws_ecs_service" "api" {
  name                              = "api"
  cluster                           = aws_ecs_cluster.this.id
  task_definition                   = aws_ecs_task_definition.this["api"].arn
  desired_count                     = var.api_desired_count
  launch_type                       = "FARGATE"
  platform_version                  = "LATEST"
  health_check_grace_period_seconds = 60
  propagate_tags                    = "SERVICE"
  enable_ecs_managed_tags           = true

  network_configuration {
    subnets          = local.service_network.subnets
    security_groups  = [aws_security_group.task["api"].id]
    assign_public_ip = local.service_network.assign_public_ip
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.api.arn
    container_name   = "behalf"
    container_port   = 8000
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  depends_on = [aws_lb_listener.https]
}

resource "aws_ecs_service" "worker" {
  name             = "worker"
  cluster          = aws_ecs_cluster.this.id
  task_definition  = aws_ecs_task_definition.this["worker"].arn
  desired_count    = var.worker_min_count
  launch_type      = "FARGATE"
  platform_version = "LATEST"
  propagate_tags   = "SERVICE"

  enable_ecs_managed_tags = true

  network_configuration {
    subnets          = local.service_network.subnets
    security_groups  = [aws_security_group.task["worker"].id]
    assign_public_ip = local.service_network.assign_public_ip
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  # The autoscaling policy owns the worker count.
  lifecycle {
    ignore_changes = [desired_count]
  }
}

resource "aws_ecs_service" "scheduler" {
  name             = "scheduler"
  cluster          = aws_ecs_cluster.this.id
  task_definition  = aws_ecs_task_definition.this["scheduler"].arn
  desired_count    = var.scheduler_desired_count
  launch_type      = "FARGATE"
  platform_version = "LATEST"
  propagate_tags   = "SERVICE"

  enable_ecs_managed_tags = true

  network_configuration {
    subnets          = local.service_network.subnets
    security_groups  = [aws_security_group.task["scheduler"].id]
    assign_public_ip = local.service_network.assign_public_ip
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }
}
