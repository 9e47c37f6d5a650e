"""The node's ``flwr-clientapp``: no app code runs here unless the site's policy accepted the run.

Flower's SuperNode hands each message of a run to a fresh ``flwr-clientapp``
process. The node's SuperNode finds this module under that name first on its
``PATH`` (``supernode.py`` writes the shim). It pulls the task input from the
SuperNode the way Flower's own process does, then, before installing or loading
the app bundle, asks ``runs.admit``: is the bundle's hash on the training policy,
is the run approved, which samples may it read? A declined run gets an error
reply whose reason starts with ``protocols.training.DECLINED_PREFIX`` (the
ServerApp records the site as declined) and its code never runs. An accepted
run's ClientApp gets the path of its sample manifest in its node config.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.args import try_obtain_flwr_app_token
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.exit import ExitCode, flwr_exit
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from node import enrollment
from node.errors import NodeError
from node.index.db import Database
from node.settings import NodeSettings, load_settings
from node.training import cohort as cohorts
from node.training import runs
from node.training.policy import TrainingPolicy
from protocols.training import (
    DECLINED_CODE,
    DECLINED_PREFIX,
    NODE_CONFIG_MANIFEST,
    NODE_CONFIG_SITE,
)

log = logging.getLogger("radfed.node.training")


def _release_studies(settings_home: Path, release: str) -> frozenset[str]:
    from node import federation  # HTTPS to the coordinator: only when a run names a release

    settings = load_settings(settings_home)
    with federation.CoordinatorClient(settings) as client:
        answer = client.request("GET", f"/api/v1/node/releases/{release}/studies")
        if answer.status_code != 200:
            raise NodeError(
                "cohort_unavailable",
                f"the coordinator did not list release {release}: {answer.text}",
            )
        return frozenset(str(uid) for uid in answer.json())


def admission(
    db: Database, settings: NodeSettings, context: Context, fab_hash: str, run_id: int
) -> runs.Admission:
    """The site's answer for this message."""
    policy = TrainingPolicy.load(settings.training_policy_path)
    config = context.run_config
    try:
        cohort = cohorts.Cohort.from_run_config(
            str(config.get("cohort-release", "")), str(config.get("cohort-filter", ""))
        )
    except NodeError as exc:
        return runs.Admission(False, exc.message)

    def build(wanted: cohorts.Cohort) -> list:  # type: ignore[type-arg]
        if wanted.release:
            wanted = cohorts.Cohort(
                wanted.release, wanted.conditions, _release_studies(settings.home, wanted.release)
            )
        return cohorts.samples(db, settings.store_dir, policy.statuses, wanted)

    return runs.admit(
        db,
        settings.training_dir,
        policy,
        enrollment.site_name(settings) or settings.site_id,
        str(config.get("radfed-run", "")),
        str(run_id),
        fab_hash,
        cohort,
        build,
    )


def _audit(db: Database, context: Context, message: Message, samples: int) -> None:
    kind = message.metadata.message_type.split(".")[0]
    runs.record_round(
        db,
        str(context.run_config.get("radfed-run", "")),
        message.metadata.group_id,
        kind,
        samples,
    )


def run_gated(
    runtime_api_address: str,
    token: str,
    insecure: bool,
    certificates: bytes | None,
    parent_pid: int | None,
) -> None:
    """Flower's ClientApp process, with the site's decision before any app code."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    context: Context | None = None
    reply: Message | None = None
    message: Message | None = None
    sub_status, details, code = SubStatus.FAILED, "the ClientApp did not finish", ExitCode.SUCCESS
    db: Database | None = None
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        settings = load_settings()  # the node home comes from the environment
        db = Database.attach(settings.index_path)
        decision = admission(db, settings, context, fab.hash_str, run.run_id)
        if not decision.accepted:
            log.warning("run %s declined here: %s", run.run_id, decision.reason)
            reply = Message(
                Error(code=DECLINED_CODE, reason=f"{DECLINED_PREFIX} {decision.reason}"),
                reply_to=message,
            )
            sub_status, details = SubStatus.COMPLETED, f"declined: {decision.reason}"
        else:
            context.node_config[NODE_CONFIG_MANIFEST] = str(decision.manifest)
            context.node_config[NODE_CONFIG_SITE] = (
                enrollment.site_name(settings) or settings.site_id
            )
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app = load(run.fab_id, run.fab_version, fab.hash_str)
            reply = app(message=message, context=context)
            samples = 0
            if not reply.has_error():
                for record in reply.content.metric_records.values():
                    samples = int(record.get("num-examples", samples))  # type: ignore[arg-type]
            _audit(db, context, message, samples)
            sub_status, details = SubStatus.COMPLETED, ""
    except Exception as exc:
        log.exception("the ClientApp failed")
        details = f"{type(exc).__name__}: {exc}"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
            )
        code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if db is not None:
            db.close()
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception:
                log.exception("could not push the reply")
                code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    flwr_exit(code=code)


def main() -> None:
    """Entry point, with ``flwr-clientapp``'s arguments."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    args = _parse_args_run_flwr_clientapp().parse_args()
    run_gated(
        runtime_api_address=args.runtime_api_address,
        token=try_obtain_flwr_app_token(args),
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
    )


if __name__ == "__main__":
    main()
