#!/usr/bin/env python3
"""Pack the Ollama STAND-IN as an Ollama Linux release: the command line of
orchestrator/sandbox/ollama_standin_release.py (which the sandbox uses too) for the Molecule
scenario, runnable under a plain python3 without the project installed.

Usage: make_release.py OUT_DIR [--version X.Y.Z] [--arch amd64|arm64]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The checkout's orchestrator package; ollama_standin_release needs only the standard library.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from orchestrator.sandbox.ollama_standin_release import main

if __name__ == "__main__":
    main()
