"""The application: the `uro-recs` command line, the process supervisor (`serve`), the demo,
systemd installation and the rollout procedure, on top of every other package."""
