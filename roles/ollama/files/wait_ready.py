"""Wait until the Ollama server answers URL, or fail at once when its unit fails.

Run on the host by the ollama role (ansible.builtin.script). Polling the URL alone
would wait out the whole timeout for a server that crash-loops (the usual case of
an unwritable OLLAMA_MODELS); the unit's ActiveState and NRestarts say sooner that
it will not come up.
Usage: wait_ready.py UNIT URL TIMEOUT_S INTERVAL_S
"""

import subprocess
import sys
import time
import urllib.error
import urllib.request


def unit_property(unit: str, name: str) -> str:
    return subprocess.run(["systemctl", "show", "--property", name, "--value", unit],
                          capture_output=True, text=True, check=False).stdout.strip()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    unit, url = sys.argv[1:3]
    timeout, interval = (float(arg) for arg in sys.argv[3:5])
    restarts_before = int(unit_property(unit, "NRestarts") or 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(url):
            print(f"{unit} answers {url}")
            return 0
        state = unit_property(unit, "ActiveState")
        restarts = int(unit_property(unit, "NRestarts") or 0) - restarts_before
        if state == "failed" or restarts > 0:
            print(f"{unit} is {state} and restarted {restarts} time(s) while starting")
            return 1
        time.sleep(interval)
    print(f"{unit} did not answer {url} within {timeout:.0f} s")
    return 1


if __name__ == "__main__":
    sys.exit(main())
