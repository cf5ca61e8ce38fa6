"""The health gate of one host: every deployment on it must answer, or the batch fails.

Run on the host by the health_gate role (ansible.builtin.script), as root: it reads each
vLLM instance's API key from the instance's own 0600 environment file, so that the key
never travels through Ansible's arguments or events. For each vLLM instance, in order:
/health answers 200, /v1/models lists the served model, one short chat completion answers;
for Ollama: /api/version, then /api/tags lists every planned model. Each is retried until
the deadline; an instance whose unit has failed is judged at once. Prints one JSON object:
{"passed": bool, "checks": [{"unit", "check", "ok", "detail", "seconds", "journal"}]}.
Usage: health_gate.py SPEC_JSON (no secrets in it: see tasks/main.yml).
"""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request


def unit_state(unit):
    return subprocess.run(["systemctl", "show", "--property", "ActiveState", "--value", unit],
                          capture_output=True, text=True, check=False).stdout.strip()


def journal(unit, lines):
    out = subprocess.run(["journalctl", "--unit", unit, "--lines", str(lines), "--no-pager",
                          "--output", "short-iso"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[-lines:]


def api_key(env_file):
    """VLLM_API_KEY of an instance's environment file (written JSON-quoted by the vllm role)."""
    try:
        with open(env_file, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VLLM_API_KEY="):
                    return json.loads(line.split("=", 1)[1])
    except FileNotFoundError:
        pass
    return None


def request(url, key=None, body=None, timeout=30):
    """(status, parsed JSON or text) of a GET, or of a POST of `body`; status 0: no answer."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            text = answer.read().decode("utf-8", "replace")
            status = answer.status
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")[:300]
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(getattr(exc, "reason", exc))
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text[:300]


def argument(args, flag):
    """The value after `flag` in a command line (either spelling, --flag VALUE or --flag=VALUE)."""
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def vllm_checks(dep, config_dir, max_tokens):
    """The checks of one vLLM instance, in order: (name, function -> (ok, detail))."""
    bind = argument(dep["args"], "--host")
    # Listening on every address: asked on loopback, as the vllm role's own wait does.
    address = "127.0.0.1" if bind in (None, "", "0.0.0.0", "::") else bind
    base = "http://{}:{}".format(f"[{address}]" if ":" in address else address, dep["port"])
    key = api_key("{}/{}.env".format(config_dir, dep["name"]))
    model = argument(dep["args"], "--served-model-name") or argument(dep["args"], "--model")

    def health():
        status, answer = request(base + "/health", timeout=10)
        return status == 200, "GET /health: %s" % (status or answer)

    def models():
        status, answer = request(base + "/v1/models", key, timeout=10)
        ids = [m.get("id") for m in answer.get("data", [])] if isinstance(answer, dict) else []
        return (status == 200 and model in ids,
                f"GET /v1/models: {status or answer}, serves {ids} (expected {model})")

    def chat():
        status, answer = request(base + "/v1/chat/completions", key, timeout=60, body={
            "model": model, "messages": [{"role": "user", "content": "Say OK."}],
            "max_tokens": max_tokens, "temperature": 0})
        choices = answer.get("choices") if isinstance(answer, dict) else None
        return (status == 200 and bool(choices),
                "POST /v1/chat/completions: {}{}".format(status or answer,
                                                     "" if status == 200 else f", {answer}"))

    return [("health", health), ("models", models), ("chat", chat)]


def ollama_checks(spec):
    base = spec["url"]

    def version():
        status, answer = request(base + "/api/version", timeout=10)
        return status == 200, f"GET /api/version: {status or answer} {answer}"

    def tags():
        status, answer = request(base + "/api/tags", timeout=10)
        names = ([m.get("name") for m in answer.get("models", [])]
                 if isinstance(answer, dict) else [])
        missing = [m for m in spec["models"] if m not in names and m + ":latest" not in names]
        return (status == 200 and not missing,
                f"GET /api/tags: {status or answer}, lists {names} (missing {missing})")

    return [("version", version), ("tags", tags)]


def gate(unit, checks, deadline, interval, journal_lines):
    """Run `checks` in order, each retried until it passes or the deadline passes."""
    results = []
    for name, check in checks:
        started = time.monotonic()
        while True:
            ok, detail = check()
            if ok:
                break
            state = unit_state(unit)
            if state == "failed" or time.monotonic() + interval > deadline:
                detail += "; {} is {}".format(unit, state or "unknown")
                break
            time.sleep(interval)
        results.append({"unit": unit, "check": name, "ok": ok, "detail": detail,
                        "seconds": round(time.monotonic() - started, 1),
                        "journal": [] if ok else journal(unit, journal_lines)})
        if not ok:
            break
    return results


def main():
    spec = json.loads(sys.argv[1])
    deadline = time.monotonic() + spec["timeout"]
    results = []
    for dep in spec["vllm"]:
        results += gate("vllm@{}.service".format(dep["name"]),
                        vllm_checks(dep, spec["config_dir"], spec["max_tokens"]),
                        deadline, spec["interval"], spec["journal_lines"])
    if spec.get("ollama"):
        results += gate("ollama.service", ollama_checks(spec["ollama"]), deadline,
                        spec["interval"], spec["journal_lines"])
    print(json.dumps({"passed": all(r["ok"] for r in results), "checks": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
