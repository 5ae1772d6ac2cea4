"""The math of the test-time defenses, as plain functions (the callbacks in
``mitigate.callbacks.defenses`` run them on test batches)."""
