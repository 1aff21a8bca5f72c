"""One module (or small package) per ``lit-saferlhf`` command; ``lit_saferlhf.cli`` holds their table.

- ``fit``: LightningCLI over every stage (``fit``, ``validate``, ``test``, ``predict``), and the
  parsing set-up that ``export`` and ``pipeline`` share.
- ``pipeline``: SFT -> reward -> cost -> PPO-Lagrangian (or an offline objective) -> evaluation -> report.
- ``evaluate`` (a package: prompt sets, generation, scoring, judging, the arena).
- ``export``: a stage's Hugging Face dir from any of its checkpoints.
- ``report``: ``report.md`` and its plots from a run's logs.
- ``select``: an FDC safety set with exact quotas per risk category (Equilibrate RLHF).
- ``merge``: a linear weight merge of policy exports (P-SACPO).
- ``world``: the safety world's splits and tokenizer.

Each command module exposes ``<name>_command(argv)``; nothing here imports ``lit_saferlhf.cli``.
"""
