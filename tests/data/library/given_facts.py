#!/usr/bin/python
"""Test helper: returns the facts it is given as the host's facts, so that a role's
fact-derived variables can be rendered for systems other than this machine."""

from ansible.module_utils.basic import AnsibleModule


def main() -> None:
    module = AnsibleModule(argument_spec={"facts": {"type": "dict", "required": True}},
                           supports_check_mode=True)
    module.exit_json(changed=False, ansible_facts=module.params["facts"])


if __name__ == "__main__":
    main()
