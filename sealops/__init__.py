"""sealops: the load, fault and chaos tools (``sealstream bench``, ``sealstream chaos``).

They drive the roles from outside, as an operator would, and import them; nothing imports
them but the ``sealstream`` command.
"""
