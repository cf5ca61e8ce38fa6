"""Wait until a vLLM instance answers /health, or fail at once when its unit fails.

Run on the host by the vllm role (ansible.builtin.script). Polling /health alone
would wait out the whole timeout for an engine that crash-loops; the unit's
ActiveState and NRestarts say sooner that it will not come up.
Usage: wait_healthy.py UNIT PORT TIMEOUT_S INTERVAL_S
"""

import subprocess
import sys
import time
import urllib.error
import urllib.request


def unit_property(unit: str, name: str) -> str:
    return subprocess.run(["systemctl", "show", "--property", name, "--value", unit],
                          capture_output=True, text=True, check=False).stdout.strip()


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    unit = sys.argv[1]
    port, timeout, interval = (int(arg) for arg in sys.argv[2:5])
    restarts_before = int(unit_property(unit, "NRestarts") or 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(port):
            print(f"{unit} answers /health on port {port}")
            return 0
        state = unit_property(unit, "ActiveState")
        restarts = int(unit_property(unit, "NRestarts") or 0) - restarts_before
        if state == "failed" or restarts > 0:
            print(f"{unit} is {state} and restarted {restarts} time(s) while starting")
            return 1
        time.sleep(interval)
    print(f"{unit} did not answer /health on port {port} within {timeout} s")
    return 1


if __name__ == "__main__":
    sys.exit(main())
