"""Provision NVIDIA GPU hosts to serve Qwen2.5 with vLLM through Ansible, and prove they work."""
