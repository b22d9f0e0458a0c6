"""Provisioning files through the relay: the HTTPS endpoint, the PBX's link, the access log.

Entry points: :func:`serve_provisioning` (the relay's side, in its task tree) and
:func:`relay.provisioning.agent.run_agent` (``pbx-relay link``, the PBX's side).
The protocol is documented for PBX vendors in docs/provisioning.md.
"""

from relay.provisioning.endpoint import ProvisioningServer, serve_provisioning
from relay.provisioning.settings import ProvisioningSettings

__all__ = ["ProvisioningServer", "ProvisioningSettings", "serve_provisioning"]
