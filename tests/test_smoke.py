from tests.helpers import run_cli, status_json


def test_fresh_install_then_noop(ws):
    first = run_cli("install", *ws.args())
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_cli("install", *ws.args())
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Nothing to do" in second.stdout
    data = status_json(*ws.args())
    assert data["verdict"] == "healthy", data
