"""After a reinstall, ComfyUI restarts only when what it loads changed (its commit, the custom
nodes, the packages): real agent, fake ComfyUI, real pip."""

from __future__ import annotations

import signal

import pytest

from tests.helpers import wait_for
from tests.test_daemon import aws, install_all, running, service, starts  # noqa: F401

pytestmark = pytest.mark.slow

NO_RESTART = "nothing ComfyUI loads changed, no restart needed"


def test_marker_rm_whose_reinstall_changes_nothing_does_not_restart(aws):
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    pid = service(aws)["pid"]
    aws.marker("dependencies_main").unlink()
    wait_for(lambda: aws.marker("dependencies_main").exists(), 30, what="marker rewritten")
    wait_for(lambda: NO_RESTART in agent.log(), 30, what="the no-restart decision")
    log = agent.log()
    assert f"reinstalled dependencies_main: {NO_RESTART}" in log, log
    assert "ComfyUI restart requested" not in log, log
    # the decision is taken in the same call that would have asked for a restart: nothing is
    # pending, the same process serves
    assert not service(aws).get("pending_restart")
    assert len(starts(aws)) == 1 and service(aws)["pid"] == pid and running(aws)


def test_reinstall_that_changes_a_package_restarts(aws):
    install_all(aws)  # podtest-alpha>=1.0: 2.0 from the local wheels
    agent = aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    aws.config["components"]["dependencies_additional"]["packages"] = [
        "podtest-gamma>=1.0", "podtest-alpha==1.0"]
    aws.save()
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(starts(aws)) == 2 and running(aws), 40, what="restart")
    log = agent.log()
    assert "reinstalled dependencies_additional: changed packages podtest-alpha 2.0 -> 1.0: " \
           "ComfyUI restarts" in log, log
    assert NO_RESTART not in log
