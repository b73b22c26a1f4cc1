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
# Optional:
#   MLFLOW_RAY_USERNAME, MLFLOW_RAY_PASSWORD   the non-admin user clients (the Ray pods) log in as:
#                                  created once the server answers, its password kept in step and
#                                  its admin flag kept off. Like every user of basic auth it reads
#                                  all experiments (default_permission READ), creates experiments
#                                  (and may edit those it created) and runs in them; an experiment
#                                  someone else created needs an operator's EDIT grant (README).
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

# MLflow 3's job-execution back end (consumer processes for MLflow's GenAI jobs, which ditlab never
# submits) stays off unless the operator sets MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true: its 8 processes
# held 1.3 GB and took 13-24 CPU seconds as they started (benchmarks/dashboard_cost.py, `mlflow ui`).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

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

# The clients' user, made through the server's own user API as admin (the admin password never
# leaves this pod). Retried until the server answers; a failure is logged, the server keeps running.
if [[ -n "${MLFLOW_RAY_USERNAME:-}" && -n "${MLFLOW_RAY_PASSWORD:-}" ]]; then
    MLFLOW_TRACKING_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" \
    MLFLOW_TRACKING_PASSWORD="$MLFLOW_AUTH_ADMIN_PASSWORD" \
    python - "http://127.0.0.1:${MLFLOW_PORT:-5000}" <<'PY' || echo "serve.sh: could not provision $MLFLOW_RAY_USERNAME" >&2
import os, sys, time
from mlflow.exceptions import RestException
from mlflow.server.auth.client import AuthServiceClient

client = AuthServiceClient(sys.argv[1])
user, password = os.environ["MLFLOW_RAY_USERNAME"], os.environ["MLFLOW_RAY_PASSWORD"]


def provision():
    try:
        client.get_user(user)
        client.update_user_password(user, password)
    except RestException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(user, password)  # the server refuses a password under 12 characters
    client.update_user_admin(user, False)


for attempt in range(60):
    try:
        provision()
        break
    except RestException:  # the server answered and refused: retrying will not help
        raise
    except Exception:  # not answering yet
        if attempt == 59:
            raise
        time.sleep(5)
print(f"serve.sh: MLflow user {user} ready (not admin)", file=sys.stderr)
PY
fi
wait "$server"
