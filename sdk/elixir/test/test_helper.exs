# Tests tagged :live talk to a running broker; they run only when URO_RECS_BROKER_IPC names
# its client.sock.
live_exclusion = if System.get_env("URO_RECS_BROKER_IPC") in [nil, ""], do: [:live], else: []
ExUnit.start(exclude: live_exclusion)
