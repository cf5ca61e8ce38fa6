"""One function per command: typed options in, a typed (pydantic) result out.

The CLI parses options, calls a workflow and prints its result as a table, or as JSON
(`result.model_dump_json()`, its schema from `orchestrate schema COMMAND`). Nothing here
imports the sandbox: what a command needs of it (its fleet, its vault password, starting
its hosts) is passed in by the caller.
"""
