"""Receiving: everything between Redis and the device. Celery glue (app, tasks, consumer), the broker
transport (bulk take, hardened envelopes), the fast path that answers messages per batch, the result
backend, task events, redelivery quarantine, the dead-letter list and the remote-control commands."""
