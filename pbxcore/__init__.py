"""What the relay and the push service share as processes: sd_notify, the watchdog, journald logging."""
