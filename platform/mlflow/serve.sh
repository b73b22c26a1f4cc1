#!/usr/bin/env bash
# Starts the shared MLflow tracking server: runs and users in Postgres, artifacts proxied to object
# storage, basic auth, Host-header allow-list. Used by the Kubernetes Deployment (k8s/mlflow.yaml)
# and by the compose file for VMs (platform/mlflow/compose.yaml); every setting arrives as an
# environment variable, secrets from a Kubernetes Secret or a git-ignored env file.
#
# Required:
#   POSTGRES_HOST, POSTGRES_USER, POSTGRES_PASSWORD   the backend database (POSTGRES_DB: mlflow,
#                                                     POSTGRES_PORT: 5432 by default)
#   MLFLOW_ARTIFACTS_DESTINATION   e.g. s3://my-bucket/mlflow or gs://my-bucket/mlflow; clients
#                                  upload through this server and need no bucket credentials
#   MLFLOW_SERVER_ALLOWED_HOSTS    comma-separated Host headers to accept, with ports, e.g.
#                                  "mlflow:5000,localhost:*"; anything else gets 403
#   MLFLOW_FLASK_SERVER_SECRET_KEY, MLFLOW_AUTH_ADMIN_PASSWORD   basic auth (admin user "admin")
# Object-store credentials: the standard variables of the client library (AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL for S3-compatible stores; GOOGLE_APPLICATION_CREDENTIALS
# for GCS) or the node's cloud identity.
set -euo pipefail

for var in POSTGRES_HOST POSTGRES_USER POSTGRES_PASSWORD MLFLOW_ARTIFACTS_DESTINATION \
           MLFLOW_SERVER_ALLOWED_HOSTS MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_ADMIN_PASSWORD; do
    if [[ -z "${!var:-}" ]]; then
        echo "serve.sh: $var is not set" >&2
        exit 2
    fi
done

# The password goes into a URI, so it is percent-encoded; the URI reaches mlflow through its
# environment variable, not the command line, so `ps` does not show it.
password=$(python -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')
database="postgresql+psycopg://${POSTGRES_USER}:${password}@${POSTGRES_HOST}:${POSTGRES_PORT:-5432}/${POSTGRES_DB:-mlflow}"
export MLFLOW_BACKEND_STORE_URI="$database"

# Basic auth keeps its users in the same database (its own tables and alembic version table), so a
# restarted pod keeps them. Its config file holds the URI, hence a private temporary file.
umask 077
auth_config=$(mktemp -t mlflow-auth.XXXXXX.ini)
trap 'rm -f "$auth_config"' EXIT
# configparser reads '%' as interpolation: the percent-encoded password needs '%%'.
cat > "$auth_config" <<EOF
[mlflow]
default_permission = READ
database_uri = ${database//%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="$auth_config"

# Not exec: the trap above removes the config file when the server stops.
mlflow server \
    --host 0.0.0.0 \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}" \
    --serve-artifacts \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS" \
    --app-name basic-auth &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; rm -f "$auth_config"' TERM INT
wait "$server"
