"""Push gateways: APNs and FCM clients, the dry-run log gateway, and the shared retry policy."""

from push.gateways.apns import ApnsGateway
from push.gateways.base import Gateway, collapse_id, deliver
from push.gateways.fcm import FcmGateway
from push.gateways.log import LogGateway

__all__ = ["ApnsGateway", "FcmGateway", "Gateway", "LogGateway", "collapse_id", "deliver"]
