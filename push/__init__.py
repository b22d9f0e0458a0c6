"""pbx-relay push wake-up service (APNs, FCM)."""
