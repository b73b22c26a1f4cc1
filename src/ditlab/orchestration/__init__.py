"""Orchestration: Ray Train, MLflow tracking. The only package importing ray and mlflow."""
