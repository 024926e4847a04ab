"""What the gateway and the providers share, and nothing else: the error model (``contract.errors``), the
events of a streamed answer (``contract.events``), and the call and its result (``contract.calls``).

It imports neither ``gateway`` nor ``providers`` (``tests/test_layout.py`` checks it); ``providers`` imports
no ``gateway`` module, so a provider is written against this package and the SDK it wraps only.
"""
