terraform {
  required_version = ">= 1.6.0, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }

  # State holds generated secrets (database password, Redis auth token, SMTP credentials):
  # keep it in an encrypted, access-controlled backend, e.g.
  #
  # backend "s3" {
  #   bucket       = "my-terraform-state"
  #   key          = "behalf/production.tfstate"
  #   region       = "eu-west-1"
  #   encrypt      = true
  #   use_lockfile = true
  # }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ Application = "behalf", Deployment = var.name }, var.tags)
  }
}
