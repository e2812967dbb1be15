# Worker autoscaling on queue depth.
#
# behalf publishes the number of jobs waiting in the Celery queue as a CloudWatch metric
# (default: namespace "behalf", metric "QueueDepth", unit Count, no dimensions, every 60 s;
# see terraform/README.md). Container Insights publishes the worker service's RunningTaskCount.
# Target tracking keeps QueueDepth / RunningTaskCount - the backlog per worker task - near
# var.worker_target_backlog_per_task, between var.worker_min_count and var.worker_max_count.
# While the metric is missing, nothing scales and the service stays at its current count.

resource "aws_appautoscaling_target" "worker" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.worker.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.worker_min_count
  max_capacity       = var.worker_max_count
}

resource "aws_appautoscaling_policy" "worker_backlog" {
  name               = "${var.name}-worker-backlog-per-task"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.worker.service_namespace
  resource_id        = aws_appautoscaling_target.worker.resource_id
  scalable_dimension = aws_appautoscaling_target.worker.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = var.worker_target_backlog_per_task
    scale_out_cooldown = 60
    scale_in_cooldown  = 300 # a long scale-in: a stopping worker finishes its jobs first

    customized_metric_specification {
      metrics {
        id          = "queue"
        label       = "Jobs waiting in the Celery queue (published by behalf)"
        return_data = false

        metric_stat {
          stat = "Maximum"

          metric {
            namespace   = var.queue_depth_metric_namespace
            metric_name = var.queue_depth_metric_name

            dynamic "dimensions" {
              for_each = var.queue_depth_metric_dimensions
              content {
                name  = dimensions.key
                value = dimensions.value
              }
            }
          }
        }
      }

      metrics {
        id          = "tasks"
        label       = "Running worker tasks (Container Insights)"
        return_data = false

        metric_stat {
          stat = "Average"

          metric {
            namespace   = "ECS/ContainerInsights"
            metric_name = "RunningTaskCount"

            dimensions {
              name  = "ClusterName"
              value = aws_ecs_cluster.this.name
            }

            dimensions {
              name  = "ServiceName"
              value = aws_ecs_service.worker.name
            }
          }
        }
      }

      metrics {
        id          = "backlog_per_task"
        label       = "Queued jobs per running worker task"
        expression  = "queue / tasks"
        return_data = true
      }
    }
  }
}
