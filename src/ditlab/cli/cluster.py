"""`ditlab submit` and `ditlab jobs`: Ray Jobs on a cluster, through its head's dashboard."""

from __future__ import annotations

import sys
import time

from ditlab.cli.common import BadInput, emit, safe_name
from ditlab.config import load

ADDRESS_HELP = ("the head's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, or $RAY_ADDRESS "
                "when it is an http URL). A cluster with token auth needs RAY_AUTH_MODE=token and the token "
                "in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def register(sub, shared) -> None:
    submit = sub.add_parser("submit", parents=[*shared.overrides, *shared.output],
                            help="run a spec as a Ray Job on a cluster (`ditlab run` there)")
    submit.add_argument("spec", help="experiment spec (YAML) inside the working directory")
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--name", help="run name (default: <spec name>-<time>); an existing run of that name resumes")
    submit.add_argument("--storage", help="where the job keeps runs and checkpoints, a path on the cluster "
                                          "(default: runs/ in the job's working directory)")
    submit.add_argument("--working-dir", default=".", help="folder shipped to the cluster as the job's working "
                                                           "directory; must hold the spec (default: .)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the job (repeatable; no credentials: the cluster "
                             "holds those). Passed on already: MLFLOW_TRACKING_URI (without user and password), "
                             "MLFLOW_EXPERIMENT_NAME, DITLAB_INCEPTION_WEIGHTS, DITLAB_VERBOSE, DITLAB_TELEMETRY")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; "
                                                              "exit 0 if it succeeded, 1 otherwise")
    submit.set_defaults(handler=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop Ray Jobs on a cluster")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    for name, text, handler in (("list", "the cluster's submitted jobs", jobs_list),
                                ("status", "a job's status", jobs_status),
                                ("logs", "a job's logs", jobs_logs),
                                ("stop", "stop a job and wait until it has ended", jobs_stop)):
        p = jobs_sub.add_parser(name, parents=shared.output if name != "logs" else shared.verbose, help=text)
        if name != "list":
            p.add_argument("job_id", help="the job's id (raysubmit_...)")
        p.add_argument("--address", help=ADDRESS_HELP)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name == "stop":
            p.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
        p.set_defaults(handler=cmd_jobs, jobs_handler=handler)


def env_assignments(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--env: expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def cmd_submit(args) -> int:
    safe_name("--name", args.name)  # the run folder on the cluster
    spec = load(args.spec, args.overrides)  # a bad spec fails here, before anything reaches the cluster
    extra_env = env_assignments(args.env)
    from ditlab.orchestration import jobs

    run_name = args.name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        address = jobs.resolve_address(args.address)
        submission = jobs.build_submission(args.spec, args.overrides, run_name, args.working_dir, args.storage,
                                           extra_env)
        client = jobs.JobsClient(address)
        job_id = client.submit(submission)
        record = {"job_id": job_id, "address": address, "run_name": run_name}
        # With --json, stdout carries exactly one JSON object: the job's logs go to stderr.
        log = sys.stderr if args.json else sys.stdout
        if not args.json:
            print(f"submitted {job_id} to {address} (run {run_name})", flush=True)
        if args.follow:
            record["status"] = follow(client, job_id, log)
            print(f"job {job_id} {record['status']}", file=log)
    except jobs.ClusterError as err:
        raise BadInput(str(err)) from None
    if args.json:
        emit(args, record, "")
    elif not args.follow:
        print(f"follow it with: ditlab jobs logs {job_id} --follow --address {address}")
    return 0 if record.get("status", "SUCCEEDED") == "SUCCEEDED" else 1


def follow(client, job_id: str, out) -> str:
    """Streams the job's logs to `out` until it ends; its final status."""
    try:
        return str(client.follow(job_id, out))
    except KeyboardInterrupt:
        raise BadInput(f"stopped following {job_id}; it keeps running (stop it with "
                       f"`ditlab jobs stop {job_id} --address {client.address}`)") from None


def jobs_list(client, args) -> int:
    from ditlab.orchestration.jobs import describe

    found = [describe(j) for j in client.list_jobs()]
    emit(args, found, "\n".join(f"{j['job_id']:28s} {j['status']:10s} {j['run_name'] or '-':24s} {j['entrypoint']}"
                                for j in found))
    return 0


def jobs_status(client, args) -> int:
    from ditlab.orchestration.jobs import describe

    job = describe(client.info(args.job_id))
    emit(args, job, f"{job['job_id']} {job['status']}: {job['message']}")
    return 0


def jobs_logs(client, args) -> int:
    if args.follow:
        return 0 if follow(client, args.job_id, sys.stdout) == "SUCCEEDED" else 1
    sys.stdout.write(client.logs(args.job_id))
    return 0


def jobs_stop(client, args) -> int:
    status = str(client.stop(args.job_id, wait=not args.no_wait))
    emit(args, {"job_id": args.job_id, "status": status}, f"job {args.job_id} {status}")
    return 0


def cmd_jobs(args) -> int:
    from ditlab.orchestration import jobs

    try:
        return args.jobs_handler(jobs.JobsClient(jobs.resolve_address(args.address)), args)
    except jobs.ClusterError as err:
        raise BadInput(str(err)) from None
