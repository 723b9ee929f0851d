"""The reward service: ``rlbench rewards serve`` (:mod:`.server`) and its clients (:mod:`.client`, the ``remote``
reward), one wire format between them (:mod:`.protocol`); :mod:`.process` runs a service in a subprocess."""
