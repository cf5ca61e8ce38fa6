"""Wait until the Ray head reports the expected number of active nodes.

Run on the head by the ray_cluster role (ansible.builtin.script) with the host's
Python; the token (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH) comes in the environment.
`ray status` reports what the autoscaler monitor last saw, a few seconds behind
the members, so the count is polled until it matches or the time is up.
Usage: wait_nodes.py RAY_BIN ADDRESS EXPECTED TIMEOUT_S INTERVAL_S
"""

import re
import subprocess
import sys
import time

_NODE_LINE = re.compile(r"^\s*(\d+)\s+node_[0-9a-f]+\s*$")


def active_nodes(status: str) -> int:
    """Sum the node lines of the "Active:" section of `ray status`."""
    count, in_active = 0, False
    for line in status.splitlines():
        if line.strip() == "Active:":
            in_active = True
        elif in_active and line.strip().endswith(":"):
            break
        elif in_active and (match := _NODE_LINE.match(line)):
            count += int(match.group(1))
    return count


def main() -> int:
    ray, address = sys.argv[1], sys.argv[2]
    expected, timeout, interval = (int(arg) for arg in sys.argv[3:6])
    deadline = time.monotonic() + timeout
    output, active = "", 0
    while True:
        proc = subprocess.run([ray, "status", "--address", address],
                              capture_output=True, text=True, check=False)
        output = proc.stdout if proc.returncode == 0 else proc.stdout + proc.stderr
        active = active_nodes(proc.stdout) if proc.returncode == 0 else 0
        if active == expected:
            print(proc.stdout.strip())
            return 0
        if time.monotonic() + interval > deadline:
            break
        time.sleep(interval)
    # The node section (active, pending, failed) when `ray status` answered, else its error.
    nodes = output.split("Resources\n")[0].strip() if "Active:" in output else ""
    tail = nodes or "\n".join(output.strip().splitlines()[-15:])
    print(f"the Ray head at {address} reports {active} active node(s) after {timeout} s, "
          f"{expected} expected; `ray status` said:\n{tail}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
